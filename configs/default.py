"""The default job: a small relaxed recursive model on the Python stdlib corpus.

  python -m recursive_lm.train --config configs/default.py --workdir runs/default
  python -m recursive_lm.train --config configs/default.py:size=tiny --workdir /tmp/tiny   # seconds on CPU

Reaches: validation loss see README (bytes, 256-symbol vocab). Time: size=tiny
~15 s on 2 CPU cores (20 steps). size=small measured ~870 tokens/s, ~4.7 s per
step of 16 x 256 tokens on a shared 2-core CPU (eval loss 2.66 after 30
steps), so 600 steps is ~45 min there: the step count is still to be tuned.

Model: 3 unique blocks run in cycle order twice (1-2-3 1-2-3, 6 effective
layers), each effective layer relaxed by its own rank-8 LoRA on every
projection; d_model 192, 4 heads, SwiGLU 512; byte tokenizer.

Variants (`:key=value,...`): size=small|tiny.
"""

from recursive_lm.config import byte_lm, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small")
  return byte_lm(a["size"], "cycle", {"tiny": 2}.get(a["size"], 6), repeats=2,
                 lora_rank={"tiny": 2}.get(a["size"], 8))
