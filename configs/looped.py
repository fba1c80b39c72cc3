"""Looped / Universal-Transformer style: one block applied num_layers times.

  python -m recursive_lm.train --config configs/looped.py --workdir runs/looped
  python -m recursive_lm.train --config configs/looped.py:num_layers=12 --workdir runs/looped12
  python -m recursive_lm.train --config configs/looped.py:size=tiny --workdir /tmp/tiny   # seconds on CPU

Reaches: validation loss see README. Stores one block for 6 effective layers
(small): the most compressed plan, same compute per token as vanilla.

Variants (`:key=value,...`): size=small|tiny, num_layers (loops, 0: the size's
default), lora_rank (default 0), per_depth_norms (default false).
"""

from recursive_lm.config import byte_lm, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small", num_layers=0, lora_rank=0, per_depth_norms=False)
  depth = a["num_layers"] or {"tiny": 2}.get(a["size"], 6)
  return byte_lm(a["size"], "looped", depth, lora_rank=a["lora_rank"], per_depth_norms=a["per_depth_norms"])
