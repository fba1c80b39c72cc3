"""Strictly tied recursive transformer: K unique blocks repeated R times.

  python -m recursive_lm.train --config configs/recursive.py --workdir runs/recursive
  python -m recursive_lm.train --config configs/recursive.py:order=sequence,repeats=3 --workdir runs/rec_seq3
  python -m recursive_lm.train --config configs/recursive.py:size=tiny --workdir /tmp/tiny   # seconds on CPU
  python -m recursive_lm.benchmark compile --config configs/recursive.py:size=tiny --repeats 4,16,64 --out c.json

Reaches: validation loss see README. With the defaults (6 effective layers,
cycle order, R=2: blocks 1-2-3 1-2-3) it stores half the block parameters of
configs/vanilla.py at the same compute; about the same time per step.

Variants (`:key=value,...`): size=small|tiny, order=cycle|sequence,
repeats (R), num_layers (effective depth, 0: the size's default; must divide
by repeats), lora_rank (0: strict tying; >0 makes it a relaxed model).
"""

from recursive_lm.config import byte_lm, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small", order="cycle", repeats=2, num_layers=0, lora_rank=0)
  depth = a["num_layers"] or {"tiny": 2}.get(a["size"], 6)
  return byte_lm(a["size"], a["order"], depth, a["repeats"], a["lora_rank"])
