"""Checkpoints with orbax: model + optimiser state, the grain iterator state
and a JSON loop record per step, plus the run's config as JSON beside them.

Layout:
  WORKDIR/config.json                    the validated Config (written once)
  WORKDIR/checkpoints/<step>/state       model and optimiser arrays (orbax)
  WORKDIR/checkpoints/<step>/data_iter   grain iterator position, per process
  WORKDIR/checkpoints/<step>/loop        {"step", "tokens", ...} as JSON

Orbax writes each step into a temporary directory and renames it when
complete, so a step directory that exists is a finished one.
"""

from __future__ import annotations

import dataclasses
import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from recursive_lm import config as config_lib
from recursive_lm import sharding
from recursive_lm.config import Config, ConfigError


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def check_or_write_config(workdir: str, cfg: Config) -> None:
  """Write config.json, or refuse a workdir holding a different model."""
  path = config_path(workdir)
  if os.path.exists(path):
    with open(path) as f:
      old = config_lib.from_json(f.read())
    if old.model != cfg.model:
      a, b = dataclasses.asdict(old.model), dataclasses.asdict(cfg.model)
      diff = sorted(k for k in a if a[k] != b[k])
      raise ConfigError(f"workdir {workdir} holds a checkpoint of a different model: model.{diff[0]} is "
                        f"{a[diff[0]]!r} there and {b[diff[0]]!r} now (differing: {', '.join(diff)})")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(cfg.to_json())
    os.replace(tmp, path)


def load_config(workdir: str) -> Config:
  path = config_path(workdir)
  if not os.path.exists(path):
    raise ConfigError(f"--workdir {workdir}: no config.json (not a recursive_lm run directory)")
  with open(path) as f:
    return config_lib.from_json(f.read())


class Checkpointer:
  """Thin wrapper over an orbax CheckpointManager with our three items."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.keep, self.async_save = keep, async_save
    self._open()

  def _open(self) -> None:
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=self.async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data_iter", "loop"),
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: nnx.State, data_iter, loop: dict) -> None:
    args = {"state": ocp.args.StandardSave(state), "loop": ocp.args.JsonSave(loop)}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state: nnx.State, data_iter=None) -> tuple[nnx.State, dict]:
    """Restore arrays onto the shardings carried by `abstract_state` and, when
    given, set `data_iter` to the saved position."""
    args = {"state": ocp.args.StandardRestore(abstract_state), "loop": ocp.args.JsonRestore()}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["state"], out["loop"]

  def restore_latest_good(self, abstract_state: nnx.State, data_iter=None, log=print):
    """(step, state, loop) of the newest checkpoint that restores, or None when
    there is none. A step that fails to restore (truncated array, missing
    item, mismatched metadata) is reported in one line and set aside as
    `<step>.unusable` (never deleted), and the next older step is tried. If
    steps exist but none restores, raises ConfigError and moves nothing."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        state, loop = self.restore(step, abstract_state, data_iter)
      except Exception as e:  # orbax raises many types for damaged files
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        failures.append((step, reason))
        log(f"checkpoint step {step} is unusable ({type(e).__name__}: {reason}); trying an older one")
        continue
      if failures:
        self._set_aside([s for s, _ in failures])
      return step, state, loop
    if failures:
      raise ConfigError(f"no usable checkpoint in {self.directory}: steps {[s for s, _ in failures]} all failed "
                        f"to restore (newest: {failures[0][1]}); nothing was changed")
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Rename damaged step directories so new saves of those steps can happen."""
    self.manager.close()
    if jax.process_index() == 0:
      for step in steps:
        src = os.path.join(self.directory, str(step))
        if os.path.isdir(src):
          os.replace(src, f"{src}.unusable")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("recursive_lm checkpoint set-aside")
    self._open()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def load_model(workdir: str, step: int | None = None, mesh=None):
  """(config, model, step) of a run directory, for evaluation, sampling and
  notebooks. Restores only the model half of the saved state."""
  from recursive_lm.model.transformer import Transformer
  from recursive_lm import optim

  cfg = load_config(workdir)
  # Analysis and sampling default to one device; pass a mesh to spread a big model.
  preset = cfg.mesh.rules if mesh is not None else "replicated"
  mesh = mesh or sharding.make_mesh(dataclasses.replace(cfg.mesh, data=1, fsdp=1, tensor=1, expert=1),
                                    devices=jax.devices()[:1])
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise ConfigError(f"--workdir {workdir}: no checkpoint found under {workdir}/checkpoints")

  def init():
    model = Transformer(cfg.model, nnx.Rngs(cfg.seed))
    tx, _ = optim.make(cfg.optim, cfg.train.steps, nnx.state(model, nnx.Param),
                       skip_nonfinite=cfg.train.on_nonfinite == "skip")
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, abstract = sharding.abstract_sharded(init, mesh, preset)
  state, _ = ckpt.restore(step, abstract)
  ckpt.close()
  model, _ = nnx.merge(graphdef, state)
  return cfg, model, step
