"""Writing a converted model as an ordinary run directory.

  WORKDIR/config.json          the full Config (model from the source, plan/LoRA from the flags,
                               data/optim/train for uptraining)
  WORKDIR/tokenizer.json       the source's tokenizer (built from GGUF metadata, or re-saved), and
  WORKDIR/tokenizer_config.json  its BOS/EOS tokens and whether the model expects BOS
  WORKDIR/checkpoints/0/       model + freshly initialised optimiser state + data iterator
  WORKDIR/conversion.json      what was converted, how, and the per-target residual left by LoRA

Training continues it with the run's own config (configs/converted.py reads
config.json back):

  python -m recursive_lm.train --config configs/converted.py:workdir=DIR --workdir DIR

`train` finds checkpoint 0 and resumes from it, so the schedule, the data
order and checkpointing are the ordinary ones; `evaluate` and `sample` read
the directory like any other run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from recursive_lm import checkpoint, data, sharding
from recursive_lm import config as config_lib
from recursive_lm.config import Config, ConfigError
from recursive_lm.convert import build, retrofit
from recursive_lm.convert.readers import KERNELS, Source
from recursive_lm.state import make_state

# Uptraining defaults: small enough for a CPU (override with --set KEY=VALUE).
UPTRAIN = {"data.seq_len": 128, "data.batch_size": 4, "data.max_bytes": 2_000_000, "optim.lr": 1e-4,
           "optim.warmup_steps": 10, "optim.weight_decay": 0.0, "train.steps": 100, "train.log_every": 10,
           "train.eval_every": 50, "train.eval_batches": 4, "train.checkpoint_every": 50}


def full_ranks(model: dict) -> str:
  """`model.lora.ranks` giving every target its full rank min(d_in, d_out)."""
  d, q, kv, f = model["d_model"], model["num_heads"] * model["head_dim"], model["num_kv_heads"] * model["head_dim"], \
      model["mlp_dim"]
  dims = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
  return ",".join(f"{t}={min(dims[t])}" for t in KERNELS)


def set_key(c: ml_collections.ConfigDict, key: str, value) -> None:
  *parents, leaf = key.split(".")
  node = c
  for p in parents:
    if p not in node:
      raise ConfigError(f"--set {key}: no such config section {p!r}")
    node = node[p]
  if leaf not in node:
    raise ConfigError(f"--set {key}: no such config field")
  old = node[leaf]
  if isinstance(value, str) and not isinstance(old, str):
    kind = type(old)
    try:
      value = (value.lower() in ("1", "true")) if kind is bool else kind(value)
    except ValueError:
      raise ConfigError(f"--set {key}={value!r} is not a {kind.__name__}") from None
  node[leaf] = value


def make_config(source: Source, plan: str = "vanilla", repeats: int = 1, lora_rank: int | str = 0,
                lora_alpha: float = 0.0, per_depth_norms: bool = False, tokenizer: str = "byte",
                overrides: dict | None = None, split: tuple[int, int, int] | None = None) -> ml_collections.ConfigDict:
  """base_config() with the source's architecture, the requested plan and LoRA,
  the uptraining defaults, then `overrides` ({dotted key: value}).

  split: (prelude, core, coda) blocks of a retrofit (plan 'recurrent',
  `recursive_lm.convert.retrofit`): the plan has prelude + core * repeats +
  coda layers, the retrofit recipe precedes the overrides, and unless
  overridden, init_state follows the injection (retrofit.INIT_STATE) and a
  curriculum spans train.steps."""
  c = config_lib.base_config()
  for key, value in source.model.items():
    set_key(c, f"model.{key}", value)
  c.model.plan.preset, c.model.plan.num_layers = plan, source.num_layers
  defaults = dict(UPTRAIN)
  if split is not None:
    prelude, core, coda = split
    c.model.plan.num_layers, c.model.plan.prelude, c.model.plan.coda = prelude + core * repeats + coda, prelude, coda
    defaults.update(retrofit.RECIPE)
  c.model.plan.repeats, c.model.plan.per_depth_norms = repeats, per_depth_norms
  if lora_rank == "full":
    c.model.lora.rank, c.model.lora.ranks = 0, full_ranks(source.model)
  else:
    c.model.lora.rank = int(lora_rank)
  c.model.lora.alpha = float(lora_alpha)
  c.data.tokenizer = tokenizer
  overrides = overrides or {}
  for key, value in {**defaults, **overrides}.items():
    set_key(c, key, value)
  c.data.seq_len = min(c.data.seq_len, c.model.max_seq_len)
  rc = c.model.recurrent
  if split is not None and "model.recurrent.init_state" not in overrides:
    rc.init_state = retrofit.INIT_STATE.get(rc.injection, rc.init_state)  # a bad injection: config.load names it
  if split is not None and "model.recurrent.curriculum_steps" not in overrides and rc.curriculum != "none":
    rc.curriculum_steps = c.train.steps
  return c


def _init_fn(cfg: Config):
  return lambda: make_state(cfg)


def write_tokenizer(source: Source, workdir: str, log=print) -> str:
  """Write WORKDIR/tokenizer.json (+ tokenizer_config.json: BOS/EOS, add_bos) for the source;
  returns the data.tokenizer spec ('byte' when there is none)."""
  if source.tokenizer is None:
    log("the source has no tokenizer; the run uses data.tokenizer='byte' (ids 0..255 only)")
    return "byte"
  tok = data.get_tokenizer(f"{source.tokenizer['kind']}:{source.tokenizer['path']}")
  return f"hf:{tok.save(os.path.abspath(workdir))}"


def write_run(source: Source, cd: ml_collections.ConfigDict, workdir: str, init: str = "stepwise",
              log=print, layer_map: list[int] | None = None) -> dict:
  """Convert `source` into `workdir` as a step-0 run. layer_map: per effective
  layer its source layer (a retrofit; see build.convert_params). Returns the conversion record."""
  started = time.time()
  cfg = config_lib.load(cd)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir)):
    raise ConfigError(f"--workdir {workdir} already holds checkpoints; convert into a new directory")
  tokenizer = data.get_tokenizer(cfg.data.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.model.vocab_size}")

  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  model, opt = sharding.create_sharded(_init_fn(cfg), mesh, cfg.mesh.rules)
  param_state = nnx.state(model, nnx.Param)
  pure = build.convert_params(source, cfg.model, nnx.to_pure_dict(param_state), init, log, layer_map)
  residuals = build.relative_residuals(source, cfg.model, pure, layer_map)
  old_leaves = jax.tree.leaves(nnx.to_pure_dict(param_state))
  new = jax.tree.map(lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding),
                     pure, nnx.to_pure_dict(param_state))
  assert len(jax.tree.leaves(new)) == len(old_leaves)
  nnx.replace_by_pure_dict(param_state, new)
  nnx.update(model, param_state)

  checkpoint.check_or_write_config(workdir, cfg)
  train_iter = data.train_iterator(cfg.data, cfg.seed, 0, 1)  # whole batches, as train.py reads them
  ckpt = checkpoint.Checkpointer(workdir, cfg.train.keep_checkpoints, async_save=False)
  _, state = nnx.split((model, opt))
  ckpt.save(0, state, train_iter, {"step": 0, "tokens": 0, "seed": cfg.seed, "converted_from": source.origin})
  ckpt.wait()
  ckpt.close()
  plan = build.plan_lib.from_config(cfg.model)
  blocks = build.source_layers(plan, source.num_layers, init) if layer_map is None else \
      build.mapped_layers(plan, layer_map)
  record = {"source": source.origin, "family": source.family, "source_layers": source.num_layers,
            "plan": cfg.model.plan.preset, "repeats": cfg.model.plan.repeats, "init": init,
            "per_depth_norms": cfg.model.plan.per_depth_norms, "lora_ranks": dict(cfg.model.lora.ranks),
            "blocks_from_source_layers": blocks,
            "relative_residual": residuals, "tokenizer": cfg.data.tokenizer,
            **({} if layer_map is None else {"effective_from_source_layers": layer_map,
                                             "recurrent": dataclasses.asdict(cfg.model.recurrent)}),
            "seconds": round(time.time() - started, 1)}
  with open(os.path.join(workdir, "conversion.json"), "w") as f:
    json.dump(record, f, indent=1)
  return record


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict whose `config.load` equals WORKDIR/config.json (for configs/converted.py)."""
  cfg = checkpoint.load_config(workdir)
  raw = json.loads(cfg.to_json())
  c = config_lib.base_config()

  def fill(node, values, prefix):
    for key, value in values.items():
      if key not in node:
        continue  # a field this version no longer has
      if isinstance(node[key], ml_collections.ConfigDict):
        fill(node[key], value, f"{prefix}{key}.")
      elif isinstance(node[key], str) and isinstance(value, list):  # a resolved list typed as a string
        node[key] = ",".join(str(v) for v in value)  # (model.mor.capacities, train.exit_loss_weights)
      else:
        node[key] = value

  lora = raw["model"].pop("lora")
  fill(c, raw, "")
  c.model.lora.rank, c.model.lora.alpha = lora["rank"], lora["alpha"]
  c.model.lora.targets = ",".join(lora["targets"])
  ranks = dict(tuple(x) for x in lora["ranks"])
  c.model.lora.ranks = ",".join(f"{t}={ranks.get(t, 0)}" for t in lora["targets"])
  return c
