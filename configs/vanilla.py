"""Vanilla (untied) transformer: every effective layer has its own block.

  python -m recursive_lm.train --config configs/vanilla.py --workdir runs/vanilla
  python -m recursive_lm.train --config configs/vanilla.py:size=tiny --workdir /tmp/tiny   # seconds on CPU

Reaches: validation loss see README. The untied baseline of configs/default.py
(same width and effective depth 6, 2x the block parameters, no LoRA); small
takes a little longer than default on 2 CPU cores.

Variants (`:key=value,...`): size=small|tiny, num_layers (0: the size's default).
"""

from recursive_lm.config import byte_lm, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small", num_layers=0)
  return byte_lm(a["size"], "vanilla", a["num_layers"] or {"tiny": 2}.get(a["size"], 6))
