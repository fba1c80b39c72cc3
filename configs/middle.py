"""Middle-cycle / middle-sequence sharing: unique first and last layers around
a shared middle stage of K blocks repeated R times.

  python -m recursive_lm.train --config configs/middle.py --workdir runs/middle
  python -m recursive_lm.train --config configs/middle.py:order=sequence --workdir runs/middle_seq
  python -m recursive_lm.train --config configs/middle.py:size=tiny --workdir /tmp/tiny   # seconds on CPU

Reaches: validation loss see README. Small: 8 effective layers = first +
2 blocks x 3 repeats + last, 4 stored blocks.

Variants (`:key=value,...`): size=small|tiny, order=cycle|sequence
(preset middle_cycle | middle_sequence), repeats, num_layers (0: the size's
default; num_layers - 2 must divide by repeats), lora_rank (default 0).
"""

from recursive_lm.config import byte_lm, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small", order="cycle", repeats=3, num_layers=0, lora_rank=0)
  depth = a["num_layers"] or {"tiny": 5}.get(a["size"], 8)  # tiny: first, 1 shared block x 3, last
  return byte_lm(a["size"], f"middle_{a['order']}", depth, a["repeats"], a["lora_rank"])
