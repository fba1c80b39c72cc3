"""Vanilla (untied) transformer: every effective layer has its own block.

  python -m recursive_lm.train --config configs/vanilla.py --workdir runs/vanilla
  python -m recursive_lm.train --config configs/vanilla.py:size=tiny --workdir /tmp/tiny   # seconds on CPU

Reaches: validation loss see README. The untied baseline of configs/default.py
(same width and effective depth 6, 2x the block parameters, no LoRA); small
takes a little longer than default on 2 CPU cores.

Variants (`:key=value,...`): size=small|tiny, num_layers (0: the size's default).
"""

from recursive_lm.config import ConfigError, base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small", num_layers=0)
  c = base_config()
  m, p = c.model, c.model.plan
  m.vocab_size = 256
  p.preset = "vanilla"
  c.data.source, c.data.tokenizer = "stdlib", "byte"
  if a["size"] == "small":
    m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 256, 4, 4, 768
    p.num_layers = 6
    c.data.seq_len, c.data.batch_size = 256, 16
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 600, 200, 200
  elif a["size"] == "tiny":
    m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 2, 2, 64
    p.num_layers = 2
    c.data.seq_len, c.data.batch_size, c.data.max_bytes = 32, 4, 200_000
    c.optim.warmup_steps = 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 20, 5, 10, 2
    c.train.checkpoint_every = 10
  else:
    raise ConfigError(f"config arg size={a['size']!r} is not one of ['small', 'tiny']")
  p.num_layers = a["num_layers"] or p.num_layers
  return c
