"""Subformer-style sandwich: unique first and last layers, one shared middle
block run num_layers - 2 times, with its own norms at each depth.

  python -m recursive_lm.train --config configs/sandwich.py --workdir runs/sandwich
  python -m recursive_lm.train --config configs/sandwich.py:size=tiny --workdir /tmp/tiny   # seconds on CPU

Reaches: validation loss see README. Stores 3 blocks for 6 effective layers
(small); per-depth norms add 2 * d_model parameters per middle depth.

Variants (`:key=value,...`): size=small|tiny, num_layers (>= 3, 0: the size's
default), per_depth_norms (default true), lora_rank (default 0).
"""

from recursive_lm.config import ConfigError, base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small", num_layers=0, per_depth_norms=True, lora_rank=0)
  c = base_config()
  m, p = c.model, c.model.plan
  m.vocab_size = 256
  c.data.source, c.data.tokenizer = "stdlib", "byte"
  if a["size"] == "small":
    m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 256, 4, 4, 768
    p.num_layers = 6
    c.data.seq_len, c.data.batch_size = 256, 16
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 600, 200, 200
  elif a["size"] == "tiny":
    m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 2, 2, 64
    p.num_layers = 4  # first, shared middle twice, last
    c.data.seq_len, c.data.batch_size, c.data.max_bytes = 32, 4, 200_000
    c.optim.warmup_steps = 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 20, 5, 10, 2
    c.train.checkpoint_every = 10
  else:
    raise ConfigError(f"config arg size={a['size']!r} is not one of ['small', 'tiny']")
  p.preset = "sandwich"
  p.num_layers = a["num_layers"] or p.num_layers
  p.per_depth_norms = a["per_depth_norms"]
  m.lora.rank = a["lora_rank"]
  return c
