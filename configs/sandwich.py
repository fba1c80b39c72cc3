"""Subformer-style sandwich: unique first and last layers, one shared middle
block run num_layers - 2 times, with its own norms at each depth.

  python -m recursive_lm.train --config configs/sandwich.py --workdir runs/sandwich
  python -m recursive_lm.train --config configs/sandwich.py:size=tiny --workdir /tmp/tiny   # seconds on CPU

Reaches: validation loss see README. Stores 3 blocks for 6 effective layers
(small); per-depth norms add 2 * d_model parameters per middle depth.

Variants (`:key=value,...`): size=small|tiny, num_layers (>= 3, 0: the size's
default), per_depth_norms (default true), lora_rank (default 0).
"""

from recursive_lm.config import byte_lm, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small", num_layers=0, per_depth_norms=True, lora_rank=0)
  depth = a["num_layers"] or {"tiny": 4}.get(a["size"], 6)  # tiny: first, shared middle twice, last
  return byte_lm(a["size"], "sandwich", depth, lora_rank=a["lora_rank"], per_depth_norms=a["per_depth_norms"])
