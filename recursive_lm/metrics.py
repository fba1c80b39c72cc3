"""Run metrics: WORKDIR/metrics.jsonl (one JSON object per line), TensorBoard
event files under WORKDIR/tb, and a console progress line. Only process 0
writes."""

from __future__ import annotations

import json
import math
import os
import sys
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
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboard.summary import Writer  # the standalone TensorBoard writer (no TensorFlow)

      self._tb = Writer(os.path.join(workdir, "tb"))

  def write(self, record: dict) -> None:
    """Append one record; scalars also go to TensorBoard, per-depth lists as depth/<name>/<i>."""
    if not self.enabled:
      return
    record = {k: _plain(v) for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    step = int(record["step"])
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

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


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
