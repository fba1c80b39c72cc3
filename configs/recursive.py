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

from recursive_lm.config import ConfigError, base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small", order="cycle", repeats=2, num_layers=0, lora_rank=0)
  if a["order"] not in ("cycle", "sequence"):
    raise ConfigError(f"config arg order={a['order']!r} is not one of ['cycle', 'sequence']")
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
    p.num_layers = 2
    c.data.seq_len, c.data.batch_size, c.data.max_bytes = 32, 4, 200_000
    c.optim.warmup_steps = 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 20, 5, 10, 2
    c.train.checkpoint_every = 10
  else:
    raise ConfigError(f"config arg size={a['size']!r} is not one of ['small', 'tiny']")
  p.preset, p.repeats = a["order"], a["repeats"]
  p.num_layers = a["num_layers"] or p.num_layers
  m.lora.rank = a["lora_rank"]
  return c
