"""Run metrics: WORKDIR/metrics.jsonl (one JSON object per line), TensorBoard
event files under WORKDIR/tb, and a console progress line. Only process 0
writes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time

import numpy as np


def _plain(value):
  if isinstance(value, (np.ndarray, np.generic)):
    value = value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._tb_dir = os.path.join(workdir, "tb")
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboard.summary import Writer  # the standalone TensorBoard writer (no TensorFlow)

      _quiet_tensorboard_thread()
      self._tb = Writer(self._tb_dir)

  def write(self, record: dict) -> None:
    """Append one record; scalars also go to TensorBoard, per-depth lists as depth/<name>/<i>."""
    if not self.enabled:
      return
    record = {k: _plain(v) for k, v in record.items()}
    with _naming(self.path):
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    step = int(record["step"])
    # TensorBoard writes from its own thread and re-raises that thread's OSError here, without a file
    # name; name the event directory so the CLI's one line says what could not be written.
    if self._tb is None:  # dropped after a failed write (the run is ending with that error)
      return
    with _naming(self._tb_dir, on_error=self._drop_tb):
      for key, value in record.items():
        if key == "step":
          continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
          self._tb.add_scalar(key, float(value), step)
        elif isinstance(value, list):
          for i, v in enumerate(value):
            if isinstance(v, (int, float)) and math.isfinite(v):
              self._tb.add_scalar(f"{key}/{i}", float(v), step)
      self._tb.flush()

  def _drop_tb(self) -> None:
    # A failed writer raises the same error again on every call, close() included: stop using it so
    # the run's exit path (checkpoint wait, the error line) is not interrupted by it.
    self._tb = None

  def close(self) -> None:
    if self._tb is not None:
      with _naming(self._tb_dir, on_error=self._drop_tb):
        self._tb.close()


def _quiet_tensorboard_thread() -> None:
  """TensorBoard's writer thread re-raises its write error out of run(), so Python prints a traceback
  on the console, although the same error reaches the caller at the next write (and becomes the
  CLI's one line). Drop that thread's report only; every other thread's goes to the usual hook."""
  previous = threading.excepthook
  if getattr(previous, "_recursive_lm", False):
    return

  def hook(args):
    if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
      return
    previous(args)

  hook._recursive_lm = True
  threading.excepthook = hook


@contextlib.contextmanager
def _naming(path: str, on_error=None):
  """Re-raise an OSError without a file name as the same error naming `path`."""
  try:
    yield
  except OSError as e:
    if on_error is not None:
      on_error()
    if e.filename:
      raise
    raise OSError(e.errno, e.strerror or str(e), path) from None


def read(workdir: str) -> list[dict]:
  """All records of a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def progress_line(step: int, total: int, loss: float, tokens_per_sec: float, mfu: float, started: float,
                  first_step: int) -> str:
  done = step - first_step
  elapsed = time.time() - started
  eta = elapsed / max(done, 1) * (total - step)
  return (f"step {step:>6}/{total}  loss {loss:.4f}  {tokens_per_sec:,.0f} tok/s  mfu {mfu:.3f}  "
          f"eta {int(eta // 60)}m{int(eta % 60):02d}s")


def console(line: str) -> None:
  print(line, flush=True, file=sys.stdout)
