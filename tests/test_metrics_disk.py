"""A full disk under the metrics writer: one OSError naming what could not be written, no second error."""

import errno
import os
import subprocess

import pytest

from recursive_lm import metrics


@pytest.fixture
def tiny_fs(tmp_path):
  path = tmp_path / "fs"
  path.mkdir()
  try:
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True,
                             text=True, timeout=30)
  except FileNotFoundError:
    pytest.skip("no mount command")
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  yield path
  subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


# TensorBoard's thread re-raises its error; the console (here: pytest's thread-exception hook) stays quiet.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_names_the_file_and_close_does_not_raise_again(tiny_fs):
  w = metrics.MetricsWriter(str(tiny_fs / "wd"))
  with pytest.raises(OSError) as raised:
    for step in range(100_000):
      w.write({"step": step, "loss": 1.0, "per_depth": [1.0] * 20})
  e = raised.value
  assert e.errno == errno.ENOSPC
  assert e.filename in (w.path, os.path.join(str(tiny_fs / "wd"), "tb")), e.filename
  w.close()  # the failed TensorBoard writer is not asked again


def test_tensorboard_thread_errors_get_the_event_directory(tmp_path, monkeypatch):
  w = metrics.MetricsWriter(str(tmp_path / "wd"))

  def fail(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")  # as TensorBoard's writer re-raises it: no file name

  monkeypatch.setattr(w._tb, "flush", fail)
  with pytest.raises(OSError) as raised:
    w.write({"step": 1, "loss": 2.0})
  assert raised.value.filename == str(tmp_path / "wd" / "tb") and raised.value.errno == errno.ENOSPC
  w.write({"step": 2, "loss": 2.0})  # metrics.jsonl still takes records; TensorBoard is dropped
  w.close()
  assert [r["step"] for r in metrics.read(str(tmp_path / "wd"))] == [1, 2]
