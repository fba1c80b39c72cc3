"""Checkpoints with orbax: model + optimiser state, the grain iterator state
and a JSON loop record per step, plus the run's config as JSON beside them.

Layout:
  WORKDIR/config.json                    the validated Config (written once)
  WORKDIR/checkpoints/<step>/state       model and optimiser arrays (orbax)
  WORKDIR/checkpoints/<step>/data_iter   grain iterator position, per process
  WORKDIR/checkpoints/<step>/loop        {"step", "tokens", ...} as JSON
  WORKDIR/checkpoints/<step>/recursive_lm_manifest.json   size and sha256 of every file

Orbax writes each step into a temporary directory and renames it when
complete, so a step directory that exists is a finished one. Orbax does not
notice every kind of damage afterwards (a flipped bit in an array file
restores as different numbers), so the manifest is written inside the
temporary directory once all the data is there, just before orbax's rename,
and checked before every restore: a step restores only when its commit
marker, metadata and manifest are present and every listed file has its
recorded size and checksum.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
      old = config_lib.from_json(f.read(), path)
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
    return config_lib.from_json(f.read(), path)


MANIFEST = "recursive_lm_manifest.json"
_COMMIT_FILES = ("commit_success.txt", "_CHECKPOINT_METADATA")  # (re)written by orbax after the manifest


class DamagedCheckpoint(RuntimeError):
  """A step directory that is incomplete or differs from its manifest."""


def _digests(step_dir: str) -> dict[str, list]:
  """{relative path: [size, sha256]} of the files under step_dir except the commit files and the manifest."""
  out = {}
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel in _COMMIT_FILES or rel.startswith(MANIFEST):
        continue
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
          h.update(chunk)
      out[rel] = [os.path.getsize(path), h.hexdigest()]
  return out


def write_manifest(step_dir: str, step: int) -> None:
  files = _digests(step_dir)
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"step": step, "files": files}, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify(step_dir: str, step: int) -> None:
  """Raise DamagedCheckpoint naming the first problem of a finished step directory."""
  for name in _COMMIT_FILES + (MANIFEST,):
    if not os.path.isfile(os.path.join(step_dir, name)):
      raise DamagedCheckpoint(f"{name} is missing (the save never completed, or files were lost)")
  try:
    with open(os.path.join(step_dir, MANIFEST)) as f:
      manifest = json.load(f)
    expected, recorded_step = manifest["files"], manifest["step"]
  except (ValueError, KeyError, TypeError) as e:
    raise DamagedCheckpoint(f"{MANIFEST} is unreadable ({type(e).__name__})") from None
  if recorded_step != step:
    raise DamagedCheckpoint(f"{MANIFEST} is for step {recorded_step}")
  actual = _digests(step_dir)
  for rel, (size, digest) in sorted(expected.items()):
    if rel not in actual:
      raise DamagedCheckpoint(f"{rel} is missing")
    if actual[rel][0] != size:
      raise DamagedCheckpoint(f"{rel} has {actual[rel][0]} bytes, {size} when saved (truncated or overwritten)")
    if actual[rel][1] != digest:
      raise DamagedCheckpoint(f"{rel} differs from the saved file (sha256 mismatch)")


class Checkpointer:
  """Thin wrapper over an orbax CheckpointManager with our three items."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.keep, self.async_save = keep, async_save
    self._saving = None  # the step whose (async) save is in flight
    self._open()

  def _open(self) -> None:
    # The manifest is written by orbax's background thread (primary process
    # only) after every process's data is complete and before the rename.
    extra = dict(async_options=ocp.AsyncOptions(post_finalization_callback=self._seal)) if self.async_save else {}
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=self.async_save,
                                           create=True, **extra)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data_iter", "loop"),
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _seal(self) -> None:
    """Write the manifest of the step being saved into orbax's temporary directory."""
    final = os.path.join(self.directory, str(self._saving))
    tmp = final + ".orbax-checkpoint-tmp"  # orbax's name for it (the final directory when writing in place)
    write_manifest(tmp if os.path.isdir(tmp) else final, self._saving)

  def save(self, step: int, state: nnx.State, data_iter, loop: dict) -> None:
    args = {"state": ocp.args.StandardSave(state), "loop": ocp.args.JsonSave(loop)}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.wait_until_finished()  # orbax would wait too; the previous _seal reads self._saving
    self._saving = step
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    if not self.async_save and jax.process_index() == 0:
      write_manifest(os.path.join(self.directory, str(step)), step)

  def restore(self, step: int, abstract_state: nnx.State, data_iter=None) -> tuple[nnx.State, dict]:
    """Restore arrays onto the shardings carried by `abstract_state` and, when
    given, set `data_iter` to the saved position. Raises DamagedCheckpoint
    when the step fails `verify`."""
    verify(os.path.join(self.directory, str(step)), step)
    args = {"state": ocp.args.StandardRestore(abstract_state), "loop": ocp.args.JsonRestore()}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    if out["loop"].get("step") != step:
      raise DamagedCheckpoint(f"its loop record is for step {out['loop'].get('step')}")
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
        dst, n = f"{src}.unusable", 1
        while os.path.exists(dst):  # set aside before (the same step damaged twice)
          dst, n = f"{src}.unusable{n}", n + 1
        if os.path.isdir(src):
          os.replace(src, dst)
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
