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

from recursive_lm.config import ConfigError, base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small", order="cycle", repeats=3, num_layers=0, lora_rank=0)
  if a["order"] not in ("cycle", "sequence"):
    raise ConfigError(f"config arg order={a['order']!r} is not one of ['cycle', 'sequence']")
  c = base_config()
  m, p = c.model, c.model.plan
  m.vocab_size = 256
  c.data.source, c.data.tokenizer = "stdlib", "byte"
  if a["size"] == "small":
    m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 256, 4, 4, 768
    p.num_layers = 8
    c.data.seq_len, c.data.batch_size = 256, 16
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 600, 200, 200
  elif a["size"] == "tiny":
    m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 2, 2, 64
    p.num_layers = 5  # first, 1 shared block x 3, last
    c.data.seq_len, c.data.batch_size, c.data.max_bytes = 32, 4, 200_000
    c.optim.warmup_steps = 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 20, 5, 10, 2
    c.train.checkpoint_every = 10
  else:
    raise ConfigError(f"config arg size={a['size']!r} is not one of ['small', 'tiny']")
  p.preset, p.repeats = f"middle_{a['order']}", a["repeats"]
  p.num_layers = a["num_layers"] or p.num_layers
  m.lora.rank = a["lora_rank"]
  return c
