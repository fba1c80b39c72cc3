"""The tiny training run that the training, reliability and config tests share.

A cycle plan of 2 blocks x 2 repeats with LoRA rank 2, d_model 32, 2 heads, on
the embedded stdlib bytes. It is a config file, so CLI tests pass
`f"{PATH}:steps=12,batch=8"` to --config, and in-process tests call `config()`.
"""

import os

from recursive_lm import config as config_lib
from recursive_lm.config import parse_arg

PATH = os.path.abspath(__file__)


def get_config(arg=None):
  a = parse_arg(arg, batch=4, steps=4, eval_every=4, checkpoint_every=2, eval_batches=1, threads=0)
  c = config_lib.base_config()
  m = c.model
  m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim, m.max_seq_len = 32, 2, 2, 64, 64
  m.plan.preset, m.plan.num_layers, m.plan.repeats = "cycle", 4, 2
  m.lora.rank = 2
  c.data.max_bytes, c.data.seq_len, c.data.batch_size = 100_000, 32, a["batch"]
  if a["threads"]:
    c.data.num_threads, c.data.prefetch = a["threads"], 2
  c.optim.warmup_steps = 2
  t = c.train
  t.steps, t.log_every, t.eval_every = a["steps"], 1, a["eval_every"]
  t.checkpoint_every, t.eval_batches = a["checkpoint_every"], a["eval_batches"]
  return c


def set_keys(cd, overrides: dict):
  """Set dotted keys {"model.d_model": 48} on a ConfigDict in place; returns it."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cd
    for part in parents:
      node = node[part]
    node[leaf] = value
  return cd


def config(arg=None, **overrides):
  """get_config(arg) with dotted-key overrides: config("steps=12", **{"model.d_model": 48})."""
  return set_keys(get_config(arg), overrides)
