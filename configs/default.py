"""The default job: a small relaxed recursive model on the Python stdlib corpus.

  python -m recursive_lm.train --config configs/default.py --workdir runs/default
  python -m recursive_lm.train --config configs/default.py:size=tiny --workdir /tmp/tiny   # seconds on CPU

Reaches: validation loss see README (bytes, 256-symbol vocab). Time: size=tiny
~15 s on 2 CPU cores (20 steps). size=small measured ~870 tokens/s, ~4.7 s per
step of 16 x 256 tokens on a shared 2-core CPU (eval loss 2.66 after 30
steps), so 600 steps is ~45 min there: the step count is still to be tuned.

Model: 3 unique blocks run in cycle order twice (1-2-3 1-2-3, 6 effective
layers), each effective layer relaxed by its own rank-8 LoRA on every
projection; d_model 256, 4 heads, SwiGLU 768; byte tokenizer.

Variants (`:key=value,...`): size=small|tiny.
"""

from recursive_lm.config import ConfigError, base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small")
  c = base_config()
  m, p = c.model, c.model.plan
  m.vocab_size = 256  # byte tokenizer
  p.preset, p.num_layers, p.repeats = "cycle", 6, 2
  m.lora.rank = 8
  c.data.source, c.data.tokenizer = "stdlib", "byte"
  c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 3e-3, "cosine", 50
  if a["size"] == "small":
    m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim, m.mlp_type = 256, 4, 4, 768, "swiglu"
    c.data.seq_len, c.data.batch_size = 256, 16
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 600, 200, 200
  elif a["size"] == "tiny":
    m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 2, 2, 64
    p.num_layers, m.lora.rank = 2, 2  # one block looped twice, each depth with its own adapter
    c.data.seq_len, c.data.batch_size, c.data.max_bytes = 32, 4, 200_000
    c.optim.warmup_steps = 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 20, 5, 10, 2
    c.train.checkpoint_every = 10
  else:
    raise ConfigError(f"config arg size={a['size']!r} is not one of ['small', 'tiny']")
  return c
