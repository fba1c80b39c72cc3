"""The ml_collections defaults every config file starts from (generated from
the declarations in `schema`), the shared sizes of the byte-level configs, and
the typed parser for `get_config(arg)` variant strings."""

from __future__ import annotations

from typing import Any

import ml_collections

from recursive_lm.config import fields
from recursive_lm.config.errors import ConfigError
from recursive_lm.config.schema import PLAN_PRESETS, Config


def base_config() -> ml_collections.ConfigDict:
  """The defaults of every key, as declared in `schema` (the full key set: an
  override of a key not listed there is an error)."""
  return fields.config_dict(Config)


# Shared sizes of the byte-level configs under configs/, so that every plan is
# compared at the same width and budget. small: the default job's size (about
# 7 minutes on 2 CPU cores); tiny: a few seconds, for tests and smoke runs.
SIZES = {
    "small": dict(d_model=192, num_heads=4, mlp_dim=512, seq_len=128, batch_size=16, max_bytes=0,
                  warmup_steps=40, steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    "tiny": dict(d_model=32, num_heads=2, mlp_dim=64, seq_len=32, batch_size=4, max_bytes=200_000,
                 warmup_steps=2, steps=20, log_every=5, eval_every=10, eval_batches=2, checkpoint_every=10),
}


def byte_lm(size: str, preset: str, num_layers: int, repeats: int = 1, lora_rank: int = 0,
            per_depth_norms: bool = False) -> ml_collections.ConfigDict:
  """A byte-level model on the embedded stdlib corpus at one of SIZES."""
  if size not in SIZES:
    raise ConfigError(f"config arg size={size!r} is not one of {list(SIZES)}")
  if preset not in PLAN_PRESETS:
    raise ConfigError(f"plan {preset!r} (from the config arg) is not one of {list(PLAN_PRESETS)}")
  z = SIZES[size]
  c = base_config()
  m, p, d, t = c.model, c.model.plan, c.data, c.train
  m.vocab_size, d.source, d.tokenizer = 256, "stdlib", "byte"
  m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = z["d_model"], z["num_heads"], z["num_heads"], z["mlp_dim"]
  p.preset, p.num_layers, p.repeats, p.per_depth_norms = preset, num_layers, repeats, per_depth_norms
  m.lora.rank = lora_rank
  d.seq_len, d.batch_size, d.max_bytes = z["seq_len"], z["batch_size"], z["max_bytes"]
  c.optim.warmup_steps = z["warmup_steps"]
  t.steps, t.log_every, t.eval_every = z["steps"], z["log_every"], z["eval_every"]
  t.eval_batches, t.checkpoint_every = z["eval_batches"], z["checkpoint_every"]
  return c


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
  """Parse a `get_config` variant string like "size=tiny,repeats=3".

  The keys and types come from `defaults`; unknown keys and values that do not
  convert to the default's type are errors.
  """
  out = dict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ConfigError(f"config arg {item!r}: expected key=value (known keys: {sorted(defaults)})")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ConfigError(f"config arg {key!r} is unknown (known keys: {sorted(defaults)})")
    kind = type(defaults[key])
    try:
      if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        out[key] = value.lower() in ("true", "1")
      else:
        out[key] = kind(value)
    except ValueError:
      raise ConfigError(f"config arg {key}={value!r} is not a {kind.__name__}") from None
  return out
