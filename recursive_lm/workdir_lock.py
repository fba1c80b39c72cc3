"""One writer per run directory: an OS lock that a second launch finds taken.

`train` and `convert` hold `WORKDIR/.lock.process_<i>` (i = the JAX process
index) with fcntl.flock for as long as they write there. The kernel drops the
lock when its holder ends in any way (kill -9 included), so a dead run never
needs manual cleanup. The file holds the holder's host, pid and program as
JSON for the refusal message; it stays behind after a run, emptied (the
record a killed holder leaves is never read: nobody holds the lock).

Why a lock per process index rather than one for process 0 alone: the
processes of one multi-host run share the workdir and each writes its own
part of every checkpoint, so each must know that no older process still
writes there. With one lock per index, a relaunch while any process of the
old run is alive (e.g. a worker that outlives its coordinator until the
heartbeat timeout) is refused by the process of the same index; with a
process-0 lock a worker of the new run would start next to a live worker of
the old one. The processes of one run never contend (different indices).
After each process tried its lock they agree (an allgather), so that a launch
is refused by all of its processes or by none.

Locks are advisory and as good as the filesystem's: local disks and NFS (v4,
or v3 with lockd) honour flock across hosts; where locking is unsupported a
warning says so and the run goes on unprotected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time

from recursive_lm.config import ConfigError


class WorkdirInUse(ConfigError):
  """Another live process holds the workdir."""


def lock_path(workdir: str, process_index: int = 0) -> str:
  return os.path.join(workdir, f".lock.process_{process_index}")


def _describe_holder(path: str) -> str:
  try:
    with open(path) as f:
      h = json.load(f)
    return (f"process {h['pid']} on host {h['host']} ({h['program']}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(h['since']))})")
  except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its record yet
    return "another process (it has not yet recorded which)"


class WorkdirLock:
  """An exclusive flock on lock_path(workdir, process_index); raises WorkdirInUse when taken."""

  def __init__(self, workdir: str, process_index: int = 0, log=None):
    self.path = lock_path(workdir, process_index)
    self.fd = None
    os.makedirs(workdir, exist_ok=True)
    # O_RDWR without O_TRUNC: a refused launch must not alter the holder's record.
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
        raise WorkdirInUse(f"workdir {workdir} is in use by {_describe_holder(self.path)}; wait for it to end or "
                           f"stop it (lock file {self.path})") from None
      (log or _stderr)(f"warning: cannot lock {self.path} ({os.strerror(e.errno)}); a second launch on this "
                       f"workdir would not be detected")
      return
    self.fd = fd
    record = {"host": socket.gethostname(), "pid": os.getpid(), "process_index": process_index,
              "program": _program(), "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)

  def release(self) -> None:
    if self.fd is not None:
      os.ftruncate(self.fd, 0)  # no stale record for whoever reads it next
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None


def _program() -> str:
  """'recursive_lm.train' for `python -m recursive_lm.train ...`, else the script's name."""
  argv = sys.orig_argv
  if "-m" in argv[:-1]:
    return argv[argv.index("-m") + 1]
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class Holder:
  """`with Holder(workdir) as lock:` ... `lock.take()` ... : the lock is taken
  where the caller is about to write (so that a launch failing earlier, on a
  bad config, say, leaves no trace) and released at the end of the block, an
  exception included."""

  def __init__(self, workdir: str, log=None):
    self.workdir, self.log, self.lock = workdir, log, None

  def __enter__(self) -> "Holder":
    return self

  def __exit__(self, *exc) -> None:
    if self.lock is not None:
      self.lock.release()
      self.lock = None

  def take(self) -> None:
    """Take this process's lock. Every process of a multi-process run must
    call it: they agree through a collective, and WorkdirInUse is raised on
    every process when any one found its lock taken. `log` receives the
    warning line when the filesystem cannot lock."""
    import jax

    pi, pc = jax.process_index(), jax.process_count()
    lock, error = None, None
    try:
      lock = WorkdirLock(self.workdir, pi, self.log)
    except WorkdirInUse as e:
      error = e
    if pc > 1:
      import numpy as np
      from jax.experimental import multihost_utils
      refused = np.asarray(multihost_utils.process_allgather(np.asarray(error is not None)))
      if error is None and refused.any():
        lock.release()
        first = int(np.flatnonzero(refused)[0])
        error = WorkdirInUse(f"workdir {self.workdir} is in use: process {first} of this run found it locked "
                             f"(see its error for by whom)")
    if error is not None:
      raise error
    self.lock = lock


@contextlib.contextmanager
def hold(workdir: str, log=None):
  """Holder(workdir) taken at once, for the block."""
  with Holder(workdir, log) as holder:
    holder.take()
    yield holder
