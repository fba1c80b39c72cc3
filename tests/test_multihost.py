"""Multi-host: two processes on 127.0.0.1 with 4 simulated CPU devices each
(jax.distributed + gloo), as a 2-host TPU slice would run.

- Each process's data is its slice of the single-process global batch, and
  sharding.global_batch reassembles exactly that batch across the processes.
- The real entry point (`python -m recursive_lm.train`) run as two processes
  on one shared workdir (orbax multi-process save) logs the losses of the
  single-process run on 8 devices (tests/test_sharding.py's reference run).

Every launch has a deadline: a hung process fails the test and both are killed.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from recursive_lm import config as config_lib
from recursive_lm import data
from test_sharding import TRAIN_OVERRIDES, assert_same_run, read_metrics, sharded_reference_run, train_config_dict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4


def process_env(port: int, process_id: int) -> dict:
  env = dict(os.environ)
  # conftest put 8 devices in XLA_FLAGS for this (parent) process; each worker has 4.
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"]),
             JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES=str(NUM_PROCESSES), JAX_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
  return env


def launch(argv: list[str], log_dir, timeout: float, grace: float = 30.0) -> list[str]:
  """Run `argv` as processes 0..N-1 of one JAX cluster; return their logs.

  Fails (after killing every process) when the deadline passes, or when one
  process exits non-zero and the others do not finish within `grace` seconds
  (a peer waiting on a dead process would otherwise hang until the deadline).
  """
  port = portpicker.pick_unused_port()
  procs, logs = [], []
  try:
    for pid in range(NUM_PROCESSES):
      log = open(os.path.join(str(log_dir), f"process_{pid}.log"), "w+")
      logs.append(log)
      procs.append(subprocess.Popen(argv, cwd=REPO, env=process_env(port, pid), stdout=log,
                                    stderr=subprocess.STDOUT))
    deadline = time.time() + timeout
    first_failure = None
    while any(p.poll() is None for p in procs):
      now = time.time()
      if first_failure is None and any(p.returncode not in (None, 0) for p in procs):
        first_failure = now
      if now > deadline or (first_failure is not None and now > first_failure + grace):
        break
      time.sleep(0.5)
  finally:
    hung = [i for i, p in enumerate(procs) if p.poll() is None]
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.wait(timeout=30)
    texts = []
    for log in logs:
      log.flush()
      log.seek(0)
      texts.append(log.read())
      log.close()
  report = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n{t[-4000:]}"
                     for i, (p, t) in enumerate(zip(procs, texts)))
  assert not hung, f"processes {hung} still running after the deadline; killed\n{report}"
  assert all(p.returncode == 0 for p in procs), f"non-zero exit\n{report}"
  return texts


def test_process_batches_are_slices_of_the_global_batch():
  cfg = config_lib.load(train_config_dict())
  b = cfg.data.batch_size
  full = data.train_iterator(cfg.data, cfg.seed, 0, 1)
  parts = [data.train_iterator(cfg.data, cfg.seed, p, NUM_PROCESSES) for p in range(NUM_PROCESSES)]
  for _ in range(3):
    want = next(full)
    got = [next(it) for it in parts]
    for key in ("inputs", "targets"):
      assert all(g[key].shape == (b // NUM_PROCESSES, cfg.data.seq_len) for g in got)
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
  want = data.eval_batches(cfg.data, 2, 0, 1)
  got = [data.eval_batches(cfg.data, 2, p, NUM_PROCESSES) for p in range(NUM_PROCESSES)]
  for k in range(2):
    np.testing.assert_array_equal(np.concatenate([g[k]["inputs"] for g in got]), want[k]["inputs"])


def test_global_batch_across_two_processes(tmp_path):
  overrides = json.dumps(TRAIN_OVERRIDES)
  t = time.time()
  logs = launch([sys.executable, os.path.join(HERE, "multihost_worker.py"), overrides], tmp_path, timeout=180)
  reports = [json.loads(line) for text in logs for line in text.splitlines() if line.startswith("{")]
  assert sorted(r["process"] for r in reports) == [0, 1], logs
  assert all(r["devices"] == 8 and r["local_devices"] == 4 and r["shards_checked"] > 0 for r in reports)
  print(f"global batch check: {time.time() - t:.1f}s")


CONFIG_FILE = '''"""Written by tests/test_multihost.py: the tiny run of tests/test_sharding.py."""
from recursive_lm.config import base_config

OVERRIDES = {overrides!r}


def get_config():
  c = base_config()
  for key, value in OVERRIDES.items():
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c
'''


@pytest.mark.slow
def test_two_process_training_matches_single_process(tmp_path, tmp_path_factory):
  config_file = tmp_path / "tiny_multihost.py"
  config_file.write_text(CONFIG_FILE.format(overrides=TRAIN_OVERRIDES))
  workdir = tmp_path / "run"
  t = time.time()
  logs = launch([sys.executable, "-m", "recursive_lm.train", "--config", str(config_file), "--workdir", str(workdir)],
                tmp_path, timeout=420)
  multi_seconds = time.time() - t
  assert "done:" in logs[0], logs[0][-3000:]
  multi_train, multi_eval = read_metrics(workdir)
  # Both processes wrote their shards of the final checkpoint into the shared workdir.
  assert os.path.isdir(workdir / "checkpoints" / "5" / "state")

  ref_train, ref_eval, ref_seconds = sharded_reference_run(tmp_path_factory.mktemp("reference"))
  assert_same_run(multi_train, multi_eval, ref_train, ref_eval)
  print(f"2-process run {multi_seconds:.1f}s; single-process 8-device run {ref_seconds:.1f}s")
