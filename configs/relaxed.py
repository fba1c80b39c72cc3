"""Relaxed recursive transformer: tied blocks plus a rank-r LoRA per depth.

  python -m recursive_lm.train --config configs/relaxed.py --workdir runs/relaxed
  python -m recursive_lm.describe --config configs/relaxed.py --table
  python -m recursive_lm.train --config configs/relaxed.py:size=tiny --workdir /tmp/tiny   # seconds on CPU

Reaches: validation loss see README; should land between configs/recursive.py
(strict tying) and configs/vanilla.py (no tying) for a small LoRA overhead.
LoRA B starts at zero, so at step 0 this is exactly the strictly tied model.

Variants (`:key=value,...`): size=small|tiny, order=cycle|sequence, repeats,
num_layers (effective depth, 0: the size's default; must divide by repeats),
lora_rank (default 8).
"""

from recursive_lm.config import byte_lm, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small", order="cycle", repeats=2, num_layers=0, lora_rank=8)
  depth = a["num_layers"] or {"tiny": 2}.get(a["size"], 6)
  return byte_lm(a["size"], a["order"], depth, a["repeats"], a["lora_rank"])
