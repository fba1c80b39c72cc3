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

A save that fails for lack of space (or a file size limit, a quota, ...)
fails in orbax's background threads; the error surfaces at the next save()
or wait() and is raised there as one CheckpointWriteError naming the step,
its directory and the cause. Orbax's and asyncio's own reports of it
(screens of tracebacks from the writer threads) are filtered from the logs.
The partial write stays in `<step>.orbax-checkpoint-tmp`, is never
restored (orbax lists only renamed, complete steps) and is removed by the
next trainer (`cleanup_tmp`) before it writes anything else: it holds the
workdir lock, so no save can be in flight there.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from recursive_lm import config as config_lib
from recursive_lm import sharding
from recursive_lm.config import Config, ConfigError


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def check_config(workdir: str, cfg: Config) -> bool:
  """Refuse (ConfigError) a workdir holding a different model; True when its
  config.json equals cfg's. Reads only: callers check before taking the
  workdir lock, so that a refused launch changes nothing."""
  path = config_path(workdir)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    text = f.read()
  if text == cfg.to_json():
    return True
  old = config_lib.from_json(text, path)
  if old.model != cfg.model:
    a, b = dataclasses.asdict(old.model), dataclasses.asdict(cfg.model)
    diff = sorted(k for k in a if a[k] != b[k])
    raise ConfigError(f"workdir {workdir} holds a checkpoint of a different model: model.{diff[0]} is "
                      f"{a[diff[0]]!r} there and {b[diff[0]]!r} now (differing: {', '.join(diff)})")
  return False


def check_or_write_config(workdir: str, cfg: Config) -> None:
  """Write config.json, or refuse a workdir holding a different model."""
  path = config_path(workdir)
  if check_config(workdir, cfg):
    return  # unchanged: no write (which a full disk would refuse before the trainer frees space)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    try:
      with open(tmp, "w") as f:
        f.write(cfg.to_json())
    except OSError as e:  # a full disk: leave no partial file, and name the file (a failed write does not)
      if os.path.exists(tmp):
        os.remove(tmp)
      raise OSError(e.errno, e.strerror, path) from e
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


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written: disk full, file size limit, quota, I/O error."""


# errno -> how the error line says it. Tensorstore (orbax's array writer) reports
# these inside a ValueError as "... [os_error_code='28']".
WRITE_CAUSES = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large (over the file size limit)",
                errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied", errno.EIO: "input/output error"}


def write_cause(e: BaseException) -> str | None:
  """The cause of a failed write, from anywhere in e's cause/context chain; None when it is no I/O error."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    code = e.errno if isinstance(e, OSError) else None
    found = re.search(r"os_error_code='(\d+)'", str(e))
    code = int(found.group(1)) if code is None and found else code
    if code in WRITE_CAUSES:
      return WRITE_CAUSES[code]
    if isinstance(e, OSError):
      return e.strerror or type(e).__name__
    e = e.__cause__ or e.__context__
  return None


def free_space(path: str) -> str:
  """Free space for unprivileged users on the filesystem holding `path` (or its nearest existing parent)."""
  while path and not os.path.isdir(path):
    path = os.path.dirname(path)
  try:
    st = os.statvfs(path)
  except OSError:
    return "unknown"
  free = st.f_bavail * st.f_frsize
  return f"{free / 2**20:.1f} MiB" if free >= 2**20 else f"{free} bytes"


class _QuietFailedSaves(logging.Filter):
  """Drops orbax's and asyncio's error reports from orbax's writer threads.
  Every such failure is raised again at the next save() / wait(), where it
  becomes one CheckpointWriteError line (or the original exception when it
  is no I/O error)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    places = [record.pathname, record.getMessage()]
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:  # asyncio's "exception was never retrieved": orbax shows only in the traceback
      places.append(tb.tb_frame.f_code.co_filename)
      tb = tb.tb_next
    # A record naming a partial step directory reports the same failed save (asyncio's "Future exception was
    # never retrieved" for each tensorstore write, whose traceback need not pass through orbax's code).
    return not any(os.sep + "orbax" + os.sep in p or ".orbax-checkpoint-tmp" in p for p in places)


_QUIET = _QuietFailedSaves()


def _quiet_unraisable(previous):
  """sys.unraisablehook minus the echoes of a failed save: after a write
  error ends orbax's event loop, tensorstore still completes the other writes
  of that save and each completion finds the loop closed ("Event loop is
  closed", with a traceback and no context); at exit, the abandoned writer
  coroutines fail to finalise. The write error itself is raised at the next
  save() / wait()."""

  def hook(u):
    if u.object is None and isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
      return
    if sys.is_finalizing() and "orbax" in repr(u.object):
      return
    previous(u)

  hook.recursive_lm_quiet = True
  return hook


class Checkpointer:
  """Thin wrapper over an orbax CheckpointManager with our three items.

  cleanup_tmp: remove orbax temporary directories (partial writes of a dead
  run) on opening; only for a process holding the workdir lock, since for
  anyone else they may be a live trainer's save in progress."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True, cleanup_tmp: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.keep, self.async_save = keep, async_save
    self._saving = None  # the step whose (async) save is in flight
    for name in ("absl", "asyncio"):  # orbax logs through absl; asyncio reports its failed tasks
      logging.getLogger(name).addFilter(_QUIET)  # (a set: adding it again is a no-op)
    if not getattr(sys.unraisablehook, "recursive_lm_quiet", False):
      sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    if cleanup_tmp:
      self._remove_partial_writes()
    self._open()

  def _remove_partial_writes(self) -> None:
    """Delete orbax's temporary step directories, now (orbax's own cleanup_tmp_directories
    option runs in the background until the first save; a full disk needs the space first)."""
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for tmp in ocp.utils.tmp_checkpoints(self.directory):
        shutil.rmtree(tmp.get(), ignore_errors=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("recursive_lm checkpoint cleanup")

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
    self.wait()  # orbax would wait too; the previous _seal reads self._saving
    self._saving = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)
      if not self.async_save and jax.process_index() == 0:
        write_manifest(os.path.join(self.directory, str(step)), step)
    except Exception as e:
      self._raise_write_error(e)
      raise

  def _raise_write_error(self, e: Exception) -> None:
    """Raise CheckpointWriteError for the step being saved when `e` is an I/O error; else return."""
    cause = write_cause(e)
    if cause is None:
      return
    step, path = self._saving, os.path.join(self.directory, str(self._saving))
    done = [int(n) for n in os.listdir(self.directory) if n.isdigit() and int(n) != step]
    earlier = f"step {max(done)} is the newest complete checkpoint" if done else "there is no earlier checkpoint"
    raise CheckpointWriteError(f"could not write the checkpoint of step {step} to {path}: {cause} "
                               f"({free_space(path)} free there); {earlier}") from e

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
    """Wait for the save in flight; raises CheckpointWriteError when it failed to write."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._raise_write_error(e)
      raise

  def close(self) -> None:
    self.manager.close()


def load_model(workdir: str, step: int | None = None, mesh=None):
  """(config, model, step) of a run directory, for evaluation, sampling and
  notebooks: the newest checkpoint (or `step`) restored into the run's model
  and optimiser (the checkpoint's layout), of which the model is returned.
  A missing directory, config.json or checkpoint raises ConfigError with one
  readable line (the CLIs' exit-2 path)."""
  from recursive_lm.state import make_state

  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir}: no such directory")
  cfg = load_config(workdir)  # ConfigError when config.json is missing
  root = os.path.join(workdir, "checkpoints")
  # Orbax names finished steps by their number; unfinished ones carry a tmp suffix.
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
  if not steps:
    raise ConfigError(f"--workdir {workdir}: no checkpoint found under {root}")
  if step is not None and step not in steps:
    raise ConfigError(f"--step={step}: no such checkpoint in {root} (have {steps})")
  # Analysis and sampling default to one device; pass a mesh to spread a big model.
  preset = cfg.mesh.rules if mesh is not None else "replicated"
  mesh = mesh or sharding.make_mesh(dataclasses.replace(cfg.mesh, data=1, fsdp=1, tensor=1, expert=1),
                                    devices=jax.devices()[:1])
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise ConfigError(f"--workdir {workdir}: no checkpoint found under {workdir}/checkpoints")

  graphdef, abstract = sharding.abstract_sharded(lambda: make_state(cfg), mesh, preset)
  state, _ = ckpt.restore(step, abstract)
  ckpt.close()
  model, _ = nnx.merge(graphdef, state)
  return cfg, model, step
