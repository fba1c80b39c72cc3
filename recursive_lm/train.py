"""Train a model: `python -m recursive_lm.train --config configs/default.py --workdir runs/demo`.

The recipe, in order: config -> mesh -> data -> model and optimiser (fresh
or restored) -> jitted step -> loop (log, evaluate, checkpoint) -> summary.
Re-running the same command on the same workdir resumes from the latest
checkpoint and continues the identical trajectory. SIGTERM / SIGINT finish
the current step, save it and exit 0.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from recursive_lm import checkpoint, cli, data, metrics, peak, sharding, workdir_lock
from recursive_lm import config as config_lib
from recursive_lm import plan as plan_lib
from recursive_lm.analysis.accounting import flops_per_token
from recursive_lm.config import Config, ConfigError
from recursive_lm.model import recurrent
from recursive_lm.state import make_state
from recursive_lm.train_step import make_eval_step, make_train_step

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (FILE[:ARG]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")


class NonFiniteError(RuntimeError):
  pass


def maybe_initialize_distributed(cfg: Config) -> None:
  """jax.distributed.initialize when the config or the launcher asks for it.

  Explicit coordinates come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID; without them JAX detects the cluster (TPU pods, SLURM).
  """
  env = os.environ
  if not (cfg.mesh.distributed or env.get("RLM_DISTRIBUTED") == "1" or "JAX_COORDINATOR_ADDRESS" in env):
    return
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in env:
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
  # A dead or hung process must end the others rather than leave them waiting:
  # a process without a heartbeat for heartbeat_timeout seconds is declared
  # dead and JAX aborts every other process ("Terminating process because the
  # JAX distributed service detected fatal errors"). A peer that dies with its
  # sockets closed fails the next collective at once (see main). JAX's
  # defaults: 300 s to connect, 100 s heartbeat, 300 s shutdown wait.
  kwargs.update(initialization_timeout=int(env.get("RLM_INIT_TIMEOUT_S", 300)),
                heartbeat_timeout_seconds=int(env.get("RLM_HEARTBEAT_TIMEOUT_S", 30)),
                shutdown_timeout_seconds=int(env.get("RLM_SHUTDOWN_TIMEOUT_S", 60)))
  jax.distributed.initialize(**kwargs)


class StopFlag:
  """Set by SIGTERM / SIGINT; the loop saves and exits at the next step boundary."""

  def __init__(self):
    self.signal = None
    for s in (signal.SIGTERM, signal.SIGINT):
      signal.signal(s, self._set)

  def _set(self, signum, frame):
    self.signal = signal.Signals(signum).name

  def agreed(self) -> bool:
    """True on every process when any process was signalled."""
    local = self.signal is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))


def evaluate_sums(eval_step, model_state, batches, mesh, preset) -> tuple[float, float]:
  """(summed loss, token count) over `batches`."""
  total, count = 0.0, 0.0
  for batch in batches:
    s, n = eval_step(model_state, sharding.global_batch(batch, mesh, preset))
    total, count = total + float(s), count + float(n)
  return total, count


def evaluate(eval_step, model_state, batches, mesh, preset) -> float:
  total, count = evaluate_sums(eval_step, model_state, batches, mesh, preset)
  return total / count


def _check_finite(step: int, m: dict) -> None:
  # param_norm: the update itself can make finite parameters non-finite (e.g. an absurd learning rate).
  bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(float(m[k]))]
  if bad:
    raise NonFiniteError(f"step {step}: non-finite {' and '.join(bad)} "
                         f"({', '.join(f'{k}={float(m[k])}' for k in bad)}); stopped without saving this step")


def _truncate_metrics(path: str, after_step: int) -> None:
  """Drop records of steps lost since the checkpoint we resume from."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for l in f:
      try:
        if json.loads(l)["step"] <= after_step:
          keep.append(l if l.endswith("\n") else l + "\n")
      except (ValueError, KeyError, TypeError):  # blank, or torn by a kill in the middle of a write
        pass
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def run(cfg: Config, workdir: str, stop_at: int | None = None, devices=None) -> dict:
  """Train to cfg.train.steps; returns the last train and eval records.

  `stop_at` ends this invocation early after saving that step (the schedule
  still spans cfg.train.steps), as a preemption would: tests and notebooks
  use it to split one run into pieces. `devices` (default: all of jax.devices())
  restricts the mesh, e.g. to one device for a single-device reference run.
  A workdir that another live process is training in is refused
  (workdir_lock.WorkdirInUse) before anything in it changes.
  """
  # 1. Devices.
  maybe_initialize_distributed(cfg)
  with workdir_lock.Holder(workdir, log=metrics.console) as lock:  # released however the run ends
    return _run(cfg, workdir, lock, stop_at, devices)


def _run(cfg: Config, workdir: str, lock: workdir_lock.Holder, stop_at: int | None, devices) -> dict:
  pi, pc = jax.process_index(), jax.process_count()
  mesh = sharding.make_mesh(cfg.mesh, devices)
  preset = cfg.mesh.rules
  sharding.check_batch(cfg.data.batch_size, mesh, preset, cfg.optim.grad_accum)

  # 2. Data.
  tokenizer, _, _ = data.load_splits(cfg.data)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                      f"{tokenizer.vocab_size} (data.tokenizer={cfg.data.tokenizer!r})")
  train_iter = data.train_iterator(cfg.data, cfg.seed, pi, pc)  # whole batches; the step splits micro-batches
  # One list per mixture component ({'': batches} without a mixture); eval_loss is over all of them.
  eval_sets = data.eval_sets(cfg.data, cfg.train.eval_batches, pi, pc)

  # 3. Model and optimiser: fresh, or restored with the data position. The workdir to
  # ourselves before the first write (a workdir of another model is refused untouched).
  checkpoint.check_config(workdir, cfg)
  lock.take()
  cli.start_library_log()
  checkpoint.check_or_write_config(workdir, cfg)
  # Holding the lock, any orbax temporary directory is a dead run's partial write: remove it.
  ckpt = checkpoint.Checkpointer(workdir, cfg.train.keep_checkpoints, cleanup_tmp=True)
  writer = metrics.MetricsWriter(workdir, enabled=pi == 0)
  init = lambda: make_state(cfg)  # noqa: E731
  graphdef, abstract = sharding.abstract_sharded(init, mesh, preset)
  restored = ckpt.restore_latest_good(abstract, train_iter, log=metrics.console)
  if restored is None:
    start, tokens_seen = 0, 0
    if pi == 0:
      _truncate_metrics(writer.path, 0)  # records of an earlier launch killed before its first checkpoint
    model, opt = sharding.create_sharded(init, mesh, preset)
    graphdef, state = nnx.split((model, opt))
  else:
    start, state, loop = restored
    tokens_seen = loop["tokens"]
    if pi == 0:
      _truncate_metrics(writer.path, start)
    metrics.console(f"resumed from step {start} in {workdir}")
  model_graphdef = nnx.graphdef(nnx.merge(graphdef, state)[0])

  # 4. Jitted steps with explicit shardings.
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  # Traced under the mesh and logical rules, so the model's activation constraints apply.
  # Recurrent plans: the step also takes its loop count and initial-state key, drawn from (seed, step).
  looped = plan_lib.from_config(cfg.model).recurrent

  def step_inputs(step: int) -> tuple:
    return ((recurrent.draw(cfg.model.recurrent, cfg.model.plan.repeats, cfg.seed, step, cfg.data.batch_size),)
            if looped else ())

  train_step = sharding.under_mesh(
      make_train_step(graphdef, state_shardings, sharding.batch_sharding(mesh, preset),
                      grad_accum=cfg.optim.grad_accum, recurrent=looped,
                      exit_weights=cfg.train.exit_loss_weights), mesh, preset)
  eval_step = sharding.under_mesh(make_eval_step(model_graphdef), mesh, preset)
  flops = flops_per_token(cfg, cfg.data.seq_len)
  peak_flops, peak_source = peak.total_peak(cfg.train.peak_flops)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len

  # 5. The loop.
  stop = StopFlag()
  started = time.time()
  window_start, window_steps, last_train, last_eval = time.time(), 0, {}, {}
  for step in range(start + 1, cfg.train.steps + 1):
    state, m = train_step(state, sharding.global_batch(next(train_iter), mesh, preset), *step_inputs(step))
    if cfg.train.on_nonfinite == "stop":
      try:
        _check_finite(step, m)
      except NonFiniteError:
        ckpt.wait()  # the last good step may still be being written: finish it before reporting
        raise
    tokens_seen += tokens_per_step
    window_steps += 1

    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
      elapsed = time.time() - window_start
      tps = window_steps * tokens_per_step / elapsed
      last_train = {"step": step, "loss": float(m["loss"]), "learning_rate": float(m["learning_rate"]),
                    "tokens_per_sec": tps, "mfu": tps * flops / peak_flops, "tokens": tokens_seen,
                    **{k: (v.tolist() if np.ndim(v) else float(v)) for k, v in m.items()
                       if k not in ("loss", "learning_rate", "finite")}}
      writer.write(last_train)
      if pi == 0:
        metrics.console(metrics.progress_line(step, cfg.train.steps, last_train["loss"], tps, last_train["mfu"],
                                              started, start))
      window_start, window_steps = time.time(), 0

    if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
      per_source = {name: evaluate_sums(eval_step, state[0], batches, mesh, preset)
                    for name, batches in eval_sets.items()}
      eval_loss = sum(s for s, _ in per_source.values()) / sum(n for _, n in per_source.values())
      last_eval = {"step": step, "eval_loss": eval_loss}
      if len(per_source) > 1 or "" not in per_source:
        last_eval.update({f"eval_loss/{name}": s / n for name, (s, n) in per_source.items()})
      if tokenizer.is_byte_level:
        last_eval["eval_bits_per_byte"] = eval_loss / math.log(2)
      writer.write(last_eval)
      if pi == 0:
        metrics.console(f"eval step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if k != "step"))
      window_start = time.time()  # evaluation time is not training throughput

    stopping = stop.agreed() or step == stop_at
    if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or stopping:
      ckpt.save(step, state, train_iter, {"step": step, "tokens": tokens_seen, "seed": cfg.seed})
    if stopping:
      ckpt.wait()
      metrics.console(f"{stop.signal or 'stop'} received: saved step {step} in {workdir}; exiting")
      break

  ckpt.wait()
  ckpt.close()
  writer.close()
  summary = {"workdir": workdir, "metrics": writer.path, "checkpoints": os.path.join(workdir, "checkpoints"),
             "train": last_train, "eval": last_eval, "wall_seconds": round(time.time() - started, 1),
             "peak_flops_source": peak_source}
  if pi == 0:
    metrics.console("done: " + json.dumps({k: summary[k] for k in ("workdir", "metrics", "checkpoints")}))
    if last_eval:
      metrics.console("final eval: " + json.dumps(last_eval))
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    print("error: --workdir is required", file=sys.stderr)
    sys.exit(2)
  cli.route_library_logs(_WORKDIR.value, "train", deferred=True)
  try:
    cfg = config_lib.load(_CONFIG.value)
    run(cfg, _WORKDIR.value)
  except (ConfigError, NonFiniteError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ConfigError) else 3)
  except checkpoint.CheckpointWriteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(5)
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
      raise
    # The same trouble outside a checkpoint (config.json, metrics, TensorBoard events).
    where = e.filename or _WORKDIR.value
    print(f"error: could not write {where}: {checkpoint.WRITE_CAUSES[e.errno]} ({checkpoint.free_space(where)} free "
          f"there)", file=sys.stderr)
    sys.exit(5)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    # A collective or barrier failed, typically because another process died.
    # Exit now: the normal exit path (jax.distributed.shutdown) would wait for
    # the dead process until the heartbeat timeout and then abort.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    print(f"error: process {jax.process_index()} of {jax.process_count()}: a cross-process operation failed, most "
          f"likely because another process died ({first}); exiting", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(4)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=cli.parse_flags)
