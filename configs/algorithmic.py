"""Synthetic algorithmic tasks (parity, addition, copy, p-hop induction) with a tiny byte model.

  python -m recursive_lm.train --config configs/algorithmic.py:task=parity,plan=looped,depth=4 --workdir runs/par_loop4
  python -m recursive_lm.evaluate --workdir runs/par_loop4        # + per-length exact-match accuracy

Only answer bytes count in the loss. Training lengths data.train_lengths, held-out
longer lengths data.eval_lengths (reported by evaluate). See
experiments/looped_algorithmic/README.md.

Variants (`:key=value,...`): size=small|tiny (tiny: d_model 32, 20 steps), task, plan (vanilla | looped | cycle | sequence | sandwich
| middle_cycle | middle_sequence), depth (effective layers), repeats, d_model, steps,
train_lengths, eval_lengths (e.g. train_lengths=1-8 as a string), seq_len (0: fits eval_lengths).
"""

from recursive_lm.config import ConfigError, base_config, parse_arg
from recursive_lm.data import synthetic


def get_config(arg=None):
  a = parse_arg(arg, size="small", task="parity", plan="looped", depth=4, repeats=1, d_model=64, steps=400,
                train_lengths="1-8", eval_lengths="9-16", seq_len=0, batch_size=32, lr=3e-3)
  if a["size"] not in ("small", "tiny"):
    raise ConfigError(f"config arg size={a['size']!r} is not one of ['small', 'tiny']")
  if a["size"] == "tiny":  # seconds on CPU (tests): overrides d_model and steps
    a["d_model"], a["steps"], a["batch_size"] = 32, 20, 8
  c = base_config()
  m, p, d, t = c.model, c.model.plan, c.data, c.train
  m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = a["d_model"], 4, 4, 4 * a["d_model"]
  p.preset, p.num_layers, p.repeats = a["plan"], a["depth"], a["repeats"]
  d.source, d.task, d.tokenizer = "synthetic", a["task"], "byte"
  d.train_lengths, d.eval_lengths = a["train_lengths"].replace(";", ","), a["eval_lengths"].replace(";", ",")
  longest = max(synthetic.parse_lengths(d.train_lengths) + synthetic.parse_lengths(d.eval_lengths))
  d.seq_len = a["seq_len"] or synthetic.max_example_len(a["task"], longest) - 1
  d.batch_size = a["batch_size"]
  c.optim.lr, c.optim.warmup_steps = a["lr"], 20
  t.steps, t.log_every, t.eval_every, t.eval_batches = a["steps"], 50, a["steps"], 4
  t.checkpoint_every = a["steps"]
  return c
