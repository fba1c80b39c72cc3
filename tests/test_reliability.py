"""What a run guarantees when things go wrong, proven with real processes.

The training runs here are the real CLI (`python -m recursive_lm.train`) in
subprocesses with one CPU device each, on a tiny relaxed recursive model
(cycle plan 2 blocks x 2 repeats, d_model 32, LoRA rank 2, seq 32, batch 4,
100 kB of the stdlib corpus), unless a test needs to look inside (then
`train.run` in-process on one of conftest's simulated devices).

- kill -9 at three points of one run's life (while the first async
  checkpoint is being written, between checkpoints, while a later checkpoint
  is being written), relaunching the same command each time: the metrics
  equal an uninterrupted run's bit for bit (slow).
- SIGTERM / SIGINT: the current step is finished and saved, the save is
  waited for, exit 0 with a message; the next launch resumes from that step
  (SIGTERM) and still matches the uninterrupted run (SIGINT, slow).
- Damaged checkpoints (truncated or bit-flipped array file, missing commit
  marker, metadata or manifest, edited metadata or loop record, missing
  item): each is detected before use, reported in one line, set aside as
  `<step>.unusable`, and the previous step is restored. Orbax alone restores a
  bit-flipped array file as different numbers (shown here), hence the
  manifest of checksums in recursive_lm.checkpoint. With no usable step the
  CLI exits 2 with one error line and changes nothing in the workdir.
- Non-finite values: a poisoned token (an id outside the vocabulary makes the
  embedding lookup NaN) stops the run at that step naming the quantity (exit
  3), or with on_nonfinite=skip the update is skipped and training goes on;
  a huge learning rate that makes the parameters non-finite stops it too.
  Every checkpoint left behind restores to finite values.
- Two processes (jax.distributed, 4 simulated devices each): kill -9 either
  one, or stop it (SIGSTOP: hung, still connected), and the other exits
  non-zero with a clear message within 60 s (slow).
- One writer per workdir: a second launch of the same command while the
  first runs (or a convert into it) exits 2 with one line naming the
  holder's pid and host and changes nothing; kill -9 of the holder frees the
  workdir without cleanup. Every process of a multi-process launch refuses
  when any one of them finds its lock taken.
- A full disk (a small tmpfs, where mount is permitted) or a file size limit
  (RLIMIT_FSIZE) during a checkpoint: exit 5 with one line naming the step,
  its directory and the cause; every earlier checkpoint verifies and
  restores; the next launch removes the partial write and resumes.
"""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from recursive_lm import checkpoint, metrics, workdir_lock
from recursive_lm import config as config_lib

import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
TIMING_KEYS = ("tokens_per_sec", "mfu")  # wall-clock dependent; everything else must reproduce exactly

TINY_ARG = "steps=10,eval_every=5,checkpoint_every=3,threads=1"
TINY_FILE = f"{tiny_run.PATH}:{TINY_ARG}"  # the --config value of the CLI runs


def tiny_cd(**overrides):
  return tiny_run.config(TINY_ARG, **overrides)


def tiny(**overrides):
  return config_lib.load(tiny_cd(**overrides))


def child_env(devices: int = 1, **extra) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    if key not in extra:
      env.pop(key, None)
  return env


class Launch:
  """`python -m recursive_lm.train ...` in the background, stdout and stderr to files we can poll."""

  def __init__(self, log_dir, name: str, args, env=None, module="recursive_lm.train", python_args=()):
    os.makedirs(log_dir, exist_ok=True)
    self.out_path, self.err_path = (os.path.join(str(log_dir), f"{name}.{s}") for s in ("out", "err"))
    self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
    self.started = time.time()
    self.proc = subprocess.Popen([sys.executable, *(python_args or ("-m", module)), *args], cwd=REPO,
                                 stdout=self._out, stderr=self._err, env=env or child_env())

  def out(self) -> str:
    with open(self.out_path) as f:
      return f.read()

  def err(self) -> str:
    with open(self.err_path) as f:
      return f.read()

  def wait_for(self, condition, timeout: float = 240, what: str = "") -> None:
    """Poll `condition()` every 2 ms until true; fail if the process ends or the deadline passes first."""
    deadline = time.time() + timeout
    while not condition():
      if self.proc.poll() is not None:
        raise AssertionError(f"process ended (exit {self.proc.returncode}) before {what}\n{self.tail()}")
      if time.time() > deadline:
        self.proc.kill()
        raise AssertionError(f"no {what} after {timeout} s\n{self.tail()}")
      time.sleep(0.002)

  def wait_for_line(self, text: str, timeout: float = 240) -> None:
    self.wait_for(lambda: text in self.out(), timeout, repr(text))

  def finish(self, timeout: float = 300) -> int:
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise AssertionError(f"still running after {timeout} s; killed\n{self.tail()}")
    finally:
      self._out.close()
      self._err.close()
    return self.proc.returncode

  def kill9(self) -> None:
    self.proc.send_signal(signal.SIGKILL)
    self.finish(30)
    assert self.proc.returncode == -signal.SIGKILL

  def tail(self) -> str:
    return f"--- stdout ---\n{self.out()[-3000:]}\n--- stderr ---\n{self.err()[-3000:]}"


def train_args(config_file, workdir, *overrides):
  return ["--config", config_file, "--workdir", str(workdir), *overrides]


def stripped(workdir) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in metrics.read(str(workdir))]


def finalized_steps(workdir) -> list[int]:
  d = os.path.join(str(workdir), "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def stop(pid: int, timeout: float = 30) -> None:
  """SIGSTOP pid and wait until every one of its threads is stopped: the signal
  arrives asynchronously, and a thread still running (an async checkpoint's
  logging) could write after a snapshot taken right away."""
  os.kill(pid, signal.SIGSTOP)
  deadline = time.monotonic() + timeout
  while True:
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
      with contextlib.suppress(FileNotFoundError):  # a thread that just exited
        with open(f"/proc/{pid}/task/{task}/stat") as f:
          states.append(f.read().rsplit(")", 1)[1].split()[0])
    if all(state in "Tt" for state in states):
      return
    if time.monotonic() > deadline:
      raise AssertionError(f"process {pid} not stopped after {timeout} s (thread states {states})")
    time.sleep(0.01)


def snapshot(root) -> dict:
  """relative path -> bytes of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(str(root)):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, str(root))] = fh.read()
  return out


def abstract_state(cfg):
  """The restore target train.run builds (model + optimiser), on one device."""
  from flax import nnx

  from recursive_lm import optim, sharding
  from recursive_lm.model.transformer import Transformer

  def init():
    model = Transformer(cfg.model, nnx.Rngs(cfg.seed))
    tx, _ = optim.make(cfg.optim, cfg.train.steps, nnx.state(model, nnx.Param),
                       skip_nonfinite=cfg.train.on_nonfinite == "skip")
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  return sharding.abstract_sharded(init, mesh, cfg.mesh.rules)[1]


def restore_every_checkpoint(workdir, cfg) -> dict[int, list[np.ndarray]]:
  """step -> leaves of every finalized checkpoint in workdir (each verified and restored)."""
  abstract = abstract_state(cfg)
  ckpt = checkpoint.Checkpointer(str(workdir), keep=cfg.train.keep_checkpoints)
  try:
    out = {}
    for step in finalized_steps(workdir):
      state, loop = ckpt.restore(step, abstract)
      assert loop["step"] == step
      out[step] = [np.asarray(x) for x in jax.tree.leaves(state)]
    return out
  finally:
    ckpt.close()


# ---------------------------------------------------------------------------
# The uninterrupted reference run (CLI, one device), shared by the tests below.


@pytest.fixture(scope="module")
def config_file():
  return TINY_FILE


class Reference:
  """Started when first requested, so it runs alongside the test's own launches; waited for on first use."""

  def __init__(self, config_file, root):
    self.workdir = root / "wd"
    self.run = Launch(root, "reference", train_args(config_file, self.workdir))
    self._records = None

  def records(self) -> list[dict]:
    if self._records is None:
      assert self.run.finish() == 0, self.run.tail()
      self._records = stripped(self.workdir)
      assert [r["step"] for r in self._records if "loss" in r] == list(range(1, STEPS + 1))
    return self._records


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
  ref = Reference(config_file, tmp_path_factory.mktemp("reference"))
  yield ref
  if ref.run.proc.poll() is None:
    ref.run.proc.kill()


def assert_same_trajectory(workdir, reference: Reference):
  want, got = reference.records(), stripped(workdir)
  assert [(r["step"], "loss" in r) for r in got] == [(r["step"], "loss" in r) for r in want]
  for a, b in zip(got, want):
    assert a == b, (a, b)  # losses, norms, learning rate, tokens, per-depth stats, evals: exact


# ---------------------------------------------------------------------------
# 1. kill -9 anywhere, then the same command again.


def _tmp_dir(workdir, step):
  return os.path.join(str(workdir), "checkpoints", f"{step}.orbax-checkpoint-tmp")


@pytest.mark.slow
def test_kill9_at_three_points_then_resume_matches_uninterrupted_run(config_file, reference, tmp_path):
  wd = tmp_path / "wd"
  args = train_args(config_file, wd)

  # A: during the first async checkpoint write (step 3; the first save of a process
  # takes seconds), before any checkpoint is complete.
  a = Launch(tmp_path, "a", args)
  a.wait_for(lambda: os.path.isdir(_tmp_dir(wd, 3)), what="the step-3 save to start")
  a.kill9()
  assert finalized_steps(wd) == [] and os.path.isdir(_tmp_dir(wd, 3)), os.listdir(wd / "checkpoints")
  assert "step      3/" in a.out()  # metrics of steps 1-3 were written and must not survive

  # B: between checkpoints: step 3 complete (its write takes a few hundred ms after the
  # 3-4 s first save() returns), steps after it logged, step 6 not yet saved.
  b = Launch(tmp_path, "b", args)
  b.wait_for(lambda: "step      4/" in b.out() and finalized_steps(wd) == [3], what="step 4 after checkpoint 3")
  b.kill9()
  assert "resumed" not in b.out()  # A left nothing to resume from
  logged = [r["step"] for r in metrics.read(str(wd)) if "loss" in r]
  assert logged == list(range(1, len(logged) + 1)) and len(logged) >= 4, logged  # to be dropped: 4 and later
  assert finalized_steps(wd) == [3]
  checkpoint.verify(os.path.join(wd, "checkpoints", "3"), 3)
  # A kill in the middle of a metrics write leaves a torn last line; the resume must cope.
  with open(wd / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "loss": 4.')

  # C: resumed from 3, killed while step 6's checkpoint is being written.
  c = Launch(tmp_path, "c", args)
  c.wait_for(lambda: os.path.isdir(_tmp_dir(wd, 6)), what="the step-6 save to start")
  c.kill9()
  assert "resumed from step 3" in c.out(), c.tail()
  assert finalized_steps(wd) == [3] and os.path.isdir(_tmp_dir(wd, 6)), os.listdir(wd / "checkpoints")

  # D: to the end.
  d = Launch(tmp_path, "d", args)
  assert d.finish() == 0, d.tail()
  assert "resumed from step 3" in d.out(), d.tail()
  assert finalized_steps(wd) == [9, 10]
  assert not [n for n in os.listdir(wd / "checkpoints") if "tmp" in n]  # orbax replaced the torn write
  assert_same_trajectory(wd, reference)


# ---------------------------------------------------------------------------
# 2. SIGTERM / SIGINT.


def _saved_step(out: str, signame: str) -> int:
  found = re.findall(rf"{signame} received: saved step (\d+) in .*; exiting", out)
  assert len(found) == 1, out
  return int(found[0])


def _signal_then_resume(sig, config_file, tmp_path) -> str:
  """Signal a run after it logged step 2; check what it left; relaunch it to the end. Returns the workdir."""
  wd = tmp_path / sig.name
  run = Launch(tmp_path, sig.name, train_args(config_file, wd))
  run.wait_for_line("step      2/")
  run.proc.send_signal(sig)
  assert run.finish() == 0, run.tail()
  step = _saved_step(run.out(), sig.name)
  assert 2 <= step < STEPS
  # The step it was on when signalled was finished, logged and saved, and the save completed.
  assert [r["step"] for r in metrics.read(str(wd)) if "loss" in r] == list(range(1, step + 1))
  assert step in finalized_steps(wd)
  checkpoint.verify(os.path.join(wd, "checkpoints", str(step)), step)
  assert not [n for n in os.listdir(wd / "checkpoints") if "tmp" in n]

  again = Launch(tmp_path, f"{sig.name}_again", train_args(config_file, wd))
  assert again.finish() == 0, again.tail()
  assert f"resumed from step {step} in" in again.out(), again.tail()
  assert [r["step"] for r in metrics.read(str(wd)) if "loss" in r] == list(range(1, STEPS + 1))
  return wd


def test_sigterm_saves_the_current_step_exits_0_and_the_next_launch_resumes(config_file, tmp_path):
  _signal_then_resume(signal.SIGTERM, config_file, tmp_path)


@pytest.mark.slow
def test_sigint_then_resume_matches_the_uninterrupted_run(config_file, reference, tmp_path):
  wd = _signal_then_resume(signal.SIGINT, config_file, tmp_path)
  assert_same_trajectory(wd, reference)


# ---------------------------------------------------------------------------
# 3. Damaged checkpoints.


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
  """A workdir with complete checkpoints of steps 1, 2, 3 (in-process, one device), and their leaves."""
  from recursive_lm import train
  cfg = tiny(**{"train.steps": 3, "train.checkpoint_every": 1, "train.keep_checkpoints": 3, "train.eval_every": 3})
  wd = tmp_path_factory.mktemp("three_steps") / "wd"
  train.run(cfg, str(wd), devices=jax.devices()[:1])
  assert finalized_steps(wd) == [1, 2, 3]
  return wd, cfg, restore_every_checkpoint(wd, cfg)


def _largest_array_file(step_dir):
  files = []
  for dirpath, _, names in os.walk(os.path.join(step_dir, "state")):
    files += [os.path.join(dirpath, n) for n in names if os.sep + "d" + os.sep in os.path.join(dirpath, n) + os.sep]
  return max(files, key=os.path.getsize)


def _truncate_array(step_dir):
  path = _largest_array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _flip_bit(step_dir, at: float = 0.5):
  """Flip the lowest bit of the byte at fraction `at` of the step's largest array file."""
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(int(os.path.getsize(path) * at))
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 1]))


def _remove(rel):
  def corrupt(step_dir):
    path = os.path.join(step_dir, rel)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  return corrupt


def _edit_json(rel, edit):
  def corrupt(step_dir):
    path = os.path.join(step_dir, rel)
    with open(path) as f:
      obj = json.load(f)
    edit(obj)
    with open(path, "w") as f:
      json.dump(obj, f)
  return corrupt


def _reshape_first_array(meta):
  first = next(iter(meta["tree_metadata"].values()))
  first["value_metadata"]["write_shape"] = [1] * len(first["value_metadata"]["write_shape"])


def _truncate_file(rel):
  def corrupt(step_dir):
    path = os.path.join(step_dir, rel)
    os.truncate(path, os.path.getsize(path) // 2)
  return corrupt


CORRUPTIONS = {
    "truncated_array_file": (_truncate_array, "truncated"),
    "bit_flip_in_array_file": (_flip_bit, "sha256"),
    "missing_commit_marker": (_remove("commit_success.txt"), "commit_success.txt is missing"),
    "missing_item_commit_marker": (_remove("state/commit_success.txt"), "state/commit_success.txt is missing"),
    "missing_checkpoint_metadata": (_remove("_CHECKPOINT_METADATA"), "_CHECKPOINT_METADATA is missing"),
    "missing_array_metadata": (_remove("state/_METADATA"), "state/_METADATA is missing"),
    "mismatched_array_metadata": (_edit_json("state/_METADATA", _reshape_first_array), "state/_METADATA"),
    "missing_manifest": (_remove(checkpoint.MANIFEST), f"{checkpoint.MANIFEST} is missing"),
    "truncated_iterator_state": (_truncate_file("data_iter/process_0-of-1.json"), "data_iter/"),
    "edited_loop_record": (_edit_json("loop/metadata", lambda r: r.update(tokens=r["tokens"] + 1)), "loop/metadata"),
    "missing_item": (_remove("loop"), "loop/"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(kind, three_steps, tmp_path):
  from recursive_lm import data
  src, cfg, leaves = three_steps
  wd = tmp_path / "wd"
  shutil.copytree(src, wd)
  step_dir = os.path.join(wd, "checkpoints", "3")
  corrupt, needle = CORRUPTIONS[kind]
  corrupt(step_dir)
  damaged = snapshot(step_dir)

  lines = []
  ckpt = checkpoint.Checkpointer(str(wd), keep=3)
  it = data.train_iterator(cfg.data, cfg.seed)
  step, state, loop = ckpt.restore_latest_good(abstract_state(cfg), it, log=lines.append)
  ckpt.close()
  assert step == 2 and loop["step"] == 2
  for got, want in zip(jax.tree.leaves(state), leaves[2]):
    np.testing.assert_array_equal(np.asarray(got), want)
  # The iterator continues where step 2 left it: the 3rd batch of a fresh pipeline.
  fresh = data.train_iterator(cfg.data, cfg.seed)
  for _ in range(2):
    next(fresh)
  np.testing.assert_array_equal(next(it)["inputs"], next(fresh)["inputs"])
  # One line, naming the step and what is wrong with it.
  assert len(lines) == 1 and "\n" not in lines[0], lines
  assert "step 3 is unusable" in lines[0] and needle in lines[0], lines
  # Set aside untouched, never deleted; the next launch no longer sees it.
  assert not os.path.exists(step_dir) and snapshot(step_dir + ".unusable") == damaged
  again = checkpoint.Checkpointer(str(wd), keep=3)
  assert again.latest_step() == 2
  again.close()


def test_orbax_alone_restores_a_bit_flip_as_different_numbers(three_steps, tmp_path):
  """Why the manifest exists: without it the flipped bit above would be trained on."""
  import orbax.checkpoint as ocp
  src, cfg, leaves = three_steps
  # Where the flipped byte lands depends on how the writer laid out the file: in a compressed chunk
  # orbax itself may notice (a decompression error); in raw data it restores different numbers. Some
  # position of the file must be the latter.
  caught = []
  for i, at in enumerate((0.5, 0.3, 0.7, 0.15, 0.85, 0.95)):
    wd = tmp_path / f"wd{i}"
    shutil.copytree(src, wd)
    _flip_bit(os.path.join(wd, "checkpoints", "3"), at)
    manager = ocp.CheckpointManager(os.path.join(wd, "checkpoints"), item_names=("state", "data_iter", "loop"))
    try:
      out = manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state(cfg))))
    except ValueError as e:
      caught.append(f"{at}: {str(e)[:80]}")
      continue
    finally:
      manager.close()
    got = [np.asarray(x) for x in jax.tree.leaves(out["state"])]
    assert any(not np.array_equal(g, w) for g, w in zip(got, leaves[3]))
    return
  pytest.fail(f"orbax caught a bit flip at every position tried: {caught}")


def test_no_usable_checkpoint_is_a_one_line_error_and_changes_nothing(three_steps, tmp_path):
  src, cfg, _ = three_steps
  wd = tmp_path / "wd"
  shutil.copytree(src, wd)
  for step, corrupt in ((1, _truncate_array), (2, _remove(checkpoint.MANIFEST)), (3, _flip_bit)):
    corrupt(os.path.join(wd, "checkpoints", str(step)))
  before = snapshot(wd)

  # In-process: ConfigError, nothing renamed.
  with pytest.raises(config_lib.ConfigError) as info:
    ckpt = checkpoint.Checkpointer(str(wd), keep=3)
    try:
      ckpt.restore_latest_good(abstract_state(cfg), log=lambda line: None)
    finally:
      ckpt.close()
  assert "no usable checkpoint" in str(info.value) and "\n" not in str(info.value)
  assert snapshot(wd) == before

  # Through the CLI (the same config, so config.json is rewritten byte for byte).
  config_file = TINY_FILE
  run = Launch(tmp_path, "cli", train_args(config_file, wd, "--config.train.steps=3", "--config.train.checkpoint_every=1",
                                           "--config.train.keep_checkpoints=3", "--config.train.eval_every=3"))
  assert run.finish() == 2, run.tail()
  errors = [l for l in run.err().splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "no usable checkpoint" in errors[0] and "[3, 2, 1]" in errors[0], run.tail()
  reports = [l for l in run.out().splitlines() if "is unusable" in l]
  assert [int(re.search(r"step (\d+)", l).group(1)) for l in reports] == [3, 2, 1], run.tail()
  after = snapshot(wd)
  for path, body in before.items():  # nothing deleted or modified (the TensorBoard writer may add an event
    assert after.get(path) == body, path  # file, the library log records go to logs/)
  assert all(p.startswith(("tb" + os.sep, "logs" + os.sep)) for p in set(after) - set(before)), set(after) - set(before)


# ---------------------------------------------------------------------------
# 5. Non-finite loss, gradients or parameters.

BAD_TOKEN = 256  # == model.vocab_size: outside the embedding table, so the lookup yields NaN
POISON_EVERY = 10  # one window in ten holds a bad token
FIRST_BAD_STEP = {}  # from the skip run, for the stop run to check against


@pytest.fixture(scope="module")
def poisoned_tokens(tmp_path_factory):
  """A prepared token directory (byte tokenizer) whose every 10th training window holds an out-of-vocabulary id."""
  from recursive_lm.data import prepare, sources
  cfg = tiny()
  train, val = sources.stdlib_splits("byte", cfg.data.max_bytes, cfg.data.val_fraction)
  train = np.array(train, dtype=np.int64)
  width = cfg.data.seq_len + 1
  train[5:len(train):width * POISON_EVERY] = BAD_TOKEN
  out = str(tmp_path_factory.mktemp("poisoned"))
  prepare.write_tokens(out, train, np.asarray(val), {"tokenizer": "byte", "vocab_size": 256, "is_byte_level": True})
  return out


def _poisoned(tokens_path, **overrides):
  return {"data.source": "tokens", "data.tokens_path": tokens_path, **overrides}


def test_skip_leaves_params_finite_and_training_goes_on(poisoned_tokens, tmp_path):
  from recursive_lm import train
  cfg = tiny(**_poisoned(poisoned_tokens, **{"train.on_nonfinite": "skip", "train.checkpoint_every": 2,
                                              "train.keep_checkpoints": 10}))
  wd = tmp_path / "wd"
  summary = train.run(cfg, str(wd), devices=jax.devices()[:1])
  recs = [r for r in metrics.read(str(wd)) if "loss" in r]
  assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
  bad = [r["step"] for r in recs if not math.isfinite(float(r["loss"]))]
  good = [r for r in recs if math.isfinite(float(r["loss"]))]
  assert bad and bad[0] < STEPS and len(good) >= 3, recs  # poisoned steps happened, and steps after them
  for r in recs:
    assert math.isfinite(r["param_norm"]), r
    if r["step"] in bad:
      assert r["update_norm"] == 0.0, r  # the update was skipped
  assert good[-1]["loss"] < good[0]["loss"]  # and it kept learning
  assert math.isfinite(summary["eval"]["eval_loss"])
  saved = restore_every_checkpoint(wd, cfg)
  assert sorted(saved) == [2, 4, 6, 8, 10]
  assert all(np.all(np.isfinite(x)) for leaves in saved.values() for x in leaves if x.dtype.kind == "f")
  FIRST_BAD_STEP["skip"] = bad[0]  # the stop-mode test below must stop at this step


def test_nonfinite_loss_stops_the_cli_at_that_step(poisoned_tokens, tmp_path):
  cfg_overrides = ["--config.data.source=tokens", f"--config.data.tokens_path={poisoned_tokens}",
                   "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=10"]
  wd = tmp_path / "wd"
  run = Launch(tmp_path, "nonfinite", train_args(TINY_FILE, wd, *cfg_overrides))
  assert run.finish() == 3, run.tail()
  errors = [l for l in run.err().splitlines() if l.startswith("error:")]
  assert len(errors) == 1, run.tail()
  # (The update computed from NaN gradients also made the parameters NaN; none of it is saved.)
  match = re.fullmatch(r"error: step (\d+): non-finite loss and grad_norm( and param_norm)? "
                       r"\(loss=nan, grad_norm=nan(, param_norm=nan)?\); stopped without saving this step", errors[0])
  assert match, errors
  stopped = int(match.group(1))
  if "skip" in FIRST_BAD_STEP:  # the skip run ran first (file order)
    assert stopped == FIRST_BAD_STEP["skip"]
  assert finalized_steps(wd) == list(range(1, stopped))  # every step before it, none of it
  cfg = tiny(**_poisoned(poisoned_tokens, **{"train.checkpoint_every": 1, "train.keep_checkpoints": 10}))
  saved = restore_every_checkpoint(wd, cfg)
  assert all(np.all(np.isfinite(x)) for leaves in saved.values() for x in leaves if x.dtype.kind == "f")
  assert [r["step"] for r in metrics.read(str(wd)) if "loss" in r] == list(range(1, stopped))


def test_an_update_that_makes_params_nonfinite_stops_before_saving(tmp_path):
  from recursive_lm import train
  # Step 1 runs at lr 0 (warmup); step 2's update at lr 5e29 leaves finite loss and
  # gradients but parameters whose norm is no longer finite.
  cfg = tiny(**{"optim.lr": 1e30, "train.checkpoint_every": 1, "train.keep_checkpoints": 10})
  wd = tmp_path / "wd"
  with pytest.raises(train.NonFiniteError, match=r"^step 2: non-finite param_norm \(param_norm=inf\)"):
    train.run(cfg, str(wd), devices=jax.devices()[:1])
  workdir_lock.WorkdirLock(str(wd)).release()  # the failed run let go of the workdir
  assert finalized_steps(wd) == [1]
  saved = restore_every_checkpoint(wd, cfg)
  assert all(np.all(np.isfinite(x)) for x in saved[1] if x.dtype.kind == "f")


# ---------------------------------------------------------------------------
# 7. Two processes; one is killed.

MULTIHOST_OVERRIDES = ["--config.data.batch_size=8", "--config.train.steps=1000", "--config.train.eval_every=1000",
                       "--config.train.checkpoint_every=1000"]


@pytest.mark.slow
@pytest.mark.parametrize("victim,how", [(1, "kill"), (0, "kill"), (1, "hang"), (0, "hang")],
                         ids=["kill_worker", "kill_coordinator", "hang_worker", "hang_coordinator"])
def test_losing_one_of_two_processes_ends_the_other_quickly(victim, how, tmp_path):
  """kill: SIGKILL, the peer's sockets close. hang: SIGSTOP, the peer stays connected but silent, so
  only the heartbeat timeout (train.maybe_initialize_distributed's default, 30 s; JAX's own is 100 s)
  can end the survivor."""
  import portpicker
  port = portpicker.pick_unused_port()
  config_file = TINY_FILE
  extra = {"RLM_HEARTBEAT_TIMEOUT_S": "10"} if how == "kill" else {}  # hang: the shipped default
  runs = [Launch(tmp_path, f"process_{pid}", train_args(config_file, tmp_path / "wd", *MULTIHOST_OVERRIDES),
                 env=child_env(devices=4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                               JAX_PROCESS_ID=str(pid), **extra))
          for pid in range(2)]
  survivor = runs[1 - victim]
  try:
    runs[0].wait_for_line("step      3/", timeout=400)
    lost = time.time()
    runs[victim].proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    code = survivor.finish(timeout=60)
    elapsed = time.time() - lost
  finally:
    for run in runs:
      if run.proc.poll() is None:
        run.proc.kill()
      run.finish(30)
  text = survivor.out() + survivor.err()
  assert code != 0, survivor.tail()
  assert elapsed < 60
  ours = "a cross-process operation failed, most likely because another process died"
  jaxs = "Terminating process because the JAX distributed service detected fatal errors"
  # Either train.main reports the failed collective (exit 4), or JAX's coordination service
  # aborts the process once the peer misses its heartbeats (SIGABRT), whichever comes first.
  assert (code == 4 and ours in text) or (code == -signal.SIGABRT and jaxs in text), survivor.tail()
  print(f"{how} process {victim}: the other exited {code} after {elapsed:.1f} s")


# ---------------------------------------------------------------------------
# 8. One writer per workdir.


def _errors(text: str) -> list[str]:
  return [l for l in text.splitlines() if l.startswith("error:")]


def _in_use(wd, pid: int, program: str = r"[^,]+") -> str:
  """The refusal line's pattern for a workdir held by `pid` on this host."""
  return (rf"error: workdir {re.escape(str(wd))} is in use by process {pid} on host {re.escape(socket.gethostname())} "
          rf"\({program}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); wait for it to end or stop it "
          rf"\(lock file {re.escape(workdir_lock.lock_path(str(wd)))}\)")


def test_workdir_lock_is_exclusive_per_process_index_and_released(tmp_path):
  wd = str(tmp_path / "wd")
  first = workdir_lock.WorkdirLock(wd)
  with pytest.raises(workdir_lock.WorkdirInUse) as info:  # flock: a second open file description conflicts
    workdir_lock.WorkdirLock(wd)
  assert re.fullmatch(_in_use(wd, os.getpid())[len("error: "):], str(info.value)), str(info.value)
  other = workdir_lock.WorkdirLock(wd, process_index=1)  # another process of the same run
  other.release()
  first.release()
  with open(workdir_lock.lock_path(wd)) as f:
    assert f.read() == ""  # no stale holder record once released
  workdir_lock.WorkdirLock(wd).release()


def test_a_filesystem_without_locks_gets_a_warning_not_a_refusal(tmp_path, monkeypatch):
  import errno
  import fcntl

  def no_locks(fd, op):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(fcntl, "flock", no_locks)
  lines = []
  lock = workdir_lock.WorkdirLock(str(tmp_path / "wd"), log=lines.append)
  lock.release()
  assert lines == [f"warning: cannot lock {workdir_lock.lock_path(str(tmp_path / 'wd'))} "
                   f"({os.strerror(errno.ENOLCK)}); a second launch on this workdir would not be detected"]


def test_a_second_trainer_on_a_workdir_is_refused_and_a_killed_one_needs_no_cleanup(tmp_path):
  wd = tmp_path / "wd"
  args = train_args(TINY_FILE, wd, "--config.train.steps=1000")
  a = Launch(tmp_path, "a", args)
  try:
    a.wait_for(lambda: "step      4/" in a.out() and finalized_steps(wd) == [3], what="step 4 after checkpoint 3")
    stop(a.proc.pid)  # still holds the lock; writes nothing while we compare
    before = snapshot(wd)
    b = Launch(tmp_path, "b", args)  # the same command again
    assert b.finish(120) == 2, b.tail()
    errors = _errors(b.err())
    assert len(errors) == 1 and re.fullmatch(_in_use(wd, a.proc.pid, r"recursive_lm\.train"), errors[0]), b.tail()
    assert "Traceback" not in b.err() and b.out() == "", b.tail()
    assert snapshot(wd) == before
  finally:
    a.proc.send_signal(signal.SIGKILL)  # kill -9 (a stopped process dies too)
    a.finish(30)
  # The kernel dropped A's lock with A: the same command resumes where A's checkpoints end, no cleanup needed.
  last = finalized_steps(wd)[-1]
  c = Launch(tmp_path, "c", train_args(TINY_FILE, wd, f"--config.train.steps={last + 2}"))
  assert c.finish() == 0, c.tail()
  assert f"resumed from step {last} in" in c.out(), c.tail()
  assert [r["step"] for r in metrics.read(str(wd)) if "loss" in r] == list(range(1, last + 3))


def test_every_process_of_a_multi_process_launch_refuses_a_workdir_in_use(tmp_path):
  """Held at process index 1 only, as by a worker of an older run that outlived its process 0: the new
  run's process 1 finds it taken, and process 0 (whose own lock was free) refuses with it."""
  import portpicker
  wd = tmp_path / "wd"
  held = workdir_lock.WorkdirLock(str(wd), process_index=1)
  port = portpicker.pick_unused_port()
  try:
    before = snapshot(wd)
    runs = [Launch(tmp_path, f"process_{pid}", train_args(TINY_FILE, wd, *MULTIHOST_OVERRIDES),
                   env=child_env(devices=4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                 JAX_PROCESS_ID=str(pid)))
            for pid in range(2)]
    codes = [run.finish(180) for run in runs]
    after = snapshot(wd)
    # Process 0 took and let go of its own (free) lock: an empty lock file is all that is new.
    assert after == {**before, ".lock.process_0": b""}, after
  finally:
    held.release()
  assert codes == [2, 2], [run.tail() for run in runs]
  first, second = (_errors(run.err()) for run in runs)
  assert first == [f"error: workdir {wd} is in use: process 1 of this run found it locked (see its error for by whom)"]
  pattern = _in_use(wd, os.getpid()).replace(re.escape(workdir_lock.lock_path(str(wd))),
                                             re.escape(workdir_lock.lock_path(str(wd), 1)))
  assert len(second) == 1 and re.fullmatch(pattern, second[0]), second


def test_convert_into_a_workdir_in_use_is_refused_and_changes_nothing(tmp_path):
  from test_convert import LLAMA, hf_weights, write_hf  # (skips when gguf is missing, as test_convert does)
  source = write_hf(tmp_path / "llama", LLAMA, hf_weights(LLAMA))
  wd = tmp_path / "wd"
  held = workdir_lock.WorkdirLock(str(wd))  # as a trainer holds it
  try:
    before = snapshot(wd)
    run = Launch(tmp_path, "convert", ["--source", f"hf:{source}", "--workdir", str(wd)],
                 module="recursive_lm.convert")
    assert run.finish(300) == 2, run.tail()
    assert snapshot(wd) == before
  finally:
    held.release()
  errors = _errors(run.err())
  assert len(errors) == 1 and re.fullmatch(_in_use(wd, os.getpid()), errors[0]), run.tail()


# ---------------------------------------------------------------------------
# 9. A full disk during a checkpoint.


@contextlib.contextmanager
def small_filesystem(path, size: str):
  """A tmpfs of `size` mounted at `path` (root only); skips the test where mounting is not permitted."""
  os.makedirs(path)
  try:
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True, timeout=30)
  except FileNotFoundError:
    pytest.skip("no mount command")
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    yield
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def _write_failure(wd, text: str, cause: str) -> tuple[int, str]:
  """(failed step, rest of the line) from the run's one error line; checks that nothing else was reported."""
  errors = _errors(text)
  assert len(errors) == 1, text[-3000:]
  match = re.fullmatch(rf"error: could not write the checkpoint of step (\d+) to {re.escape(str(wd))}/checkpoints/"
                       rf"(\d+): {re.escape(cause)} \(([^)]+) free there\); (.*)", errors[0])
  assert match and match.group(1) == match.group(2), errors[0]
  # No tracebacks, and no error records of orbax's writer threads (absl's "E...." lines) or asyncio's.
  assert "Traceback" not in text and not re.search(r"^E\d{4} ", text, re.M), text[-3000:]
  return int(match.group(1)), match.group(4)


KEEP_ALL = ("--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=10")


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_earlier_checkpoints_survive(tmp_path):
  fs = tmp_path / "fs"
  # 700 kB: config, metrics and the first checkpoint (about 500 kB) fit, a second checkpoint does not.
  with small_filesystem(fs, "700k"):
    wd = fs / "wd"
    args = train_args(TINY_FILE, wd, "--config.train.steps=4", *KEEP_ALL)
    cfg = tiny(**{"train.steps": 4, "train.checkpoint_every": 1, "train.keep_checkpoints": 10})
    for attempt in ("full", "still_full"):
      # still_full: the same command on the same full disk first removes the partial write, resumes,
      # and fails the same way at the same step (no garbage accumulates, no other write fails first).
      run = Launch(tmp_path, attempt, args)
      assert run.finish() == 5, run.tail()
      failed, rest = _write_failure(wd, run.err(), "no space left on device")
      assert failed >= 2 and rest == f"step {failed - 1} is the newest complete checkpoint", rest
      assert finalized_steps(wd) == list(range(1, failed))
      assert [n for n in os.listdir(wd / "checkpoints") if "tmp" in n] == [os.path.basename(_tmp_dir(wd, failed))]
      assert sorted(restore_every_checkpoint(wd, cfg)) == list(range(1, failed))  # each verified and restored
      assert os.path.isdir(_tmp_dir(wd, failed))  # a reader leaves the partial write alone
      if attempt == "still_full":
        assert f"resumed from step {failed - 1} in" in run.out() and failed == first_failed, run.tail()
      first_failed = failed

    # Space again; the same command removes the partial write and resumes.
    subprocess.run(["mount", "-o", "remount,size=8m", str(fs)], check=True, timeout=30)
    again = Launch(tmp_path, "space_again", args)
    assert again.finish() == 0, again.tail()
    assert f"resumed from step {failed - 1} in" in again.out(), again.tail()
    assert finalized_steps(wd) == [1, 2, 3, 4]
    assert not [n for n in os.listdir(wd / "checkpoints") if "tmp" in n]
    assert [r["step"] for r in metrics.read(str(wd)) if "loss" in r] == [1, 2, 3, 4]


def _file_size_limit(limit: int) -> tuple[str, str]:
  """Python arguments that run recursive_lm.train with files limited to `limit` bytes (set in the child
  itself: a preexec_fn would run Python after fork in this multithreaded process)."""
  return ("-c", "import resource, runpy, signal, sys\n"
                # Ignored, SIGXFSZ no longer kills the writer: the write fails with EFBIG.
                "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
                "sys.argv[0] = 'recursive_lm/train.py'\n"
                "runpy.run_module('recursive_lm.train', run_name='__main__', alter_sys=True)\n")


def test_a_file_size_limit_during_the_first_checkpoint_is_one_line(tmp_path):
  """No mount needed: the largest array file of a checkpoint (about 200 kB) exceeds a 100 kB limit."""
  wd = tmp_path / "wd"
  run = Launch(tmp_path, "fsize", train_args(TINY_FILE, wd, "--config.train.steps=3", *KEEP_ALL),
               python_args=_file_size_limit(100_000))
  assert run.finish() == 5, run.tail()
  failed, rest = _write_failure(wd, run.err(), "file too large (over the file size limit)")
  assert failed == 1 and rest == "there is no earlier checkpoint", rest
  assert finalized_steps(wd) == [] and os.path.isdir(_tmp_dir(wd, 1))


def test_a_file_size_limit_outside_a_checkpoint_is_one_line(tmp_path):
  """config.json (about 3 kB) over a 1.5 kB limit: the first write of a run."""
  wd = tmp_path / "wd"
  run = Launch(tmp_path, "fsize", train_args(TINY_FILE, wd), python_args=_file_size_limit(1500))
  assert run.finish() == 5, run.tail()
  errors = _errors(run.err())
  assert len(errors) == 1 and re.fullmatch(rf"error: could not write {re.escape(str(wd))}/config\.json: file too large "
                                           r"\(over the file size limit\) \([0-9.]+ (MiB|bytes) free there\)",
                                           errors[0]), run.tail()
  assert "Traceback" not in run.err()
  assert sorted(os.listdir(wd)) == [".lock.process_0", "logs"]  # no partial config.json(.tmp); the library log


def test_stale_temporary_directories_are_removed_by_the_trainer_only(three_steps, tmp_path):
  src, cfg, leaves = three_steps
  wd = tmp_path / "wd"
  shutil.copytree(src, wd)
  stale = [_tmp_dir(wd, 4), _tmp_dir(wd, 2)]  # a dead run's partial writes: a new step and a re-save
  for path in stale:
    os.makedirs(os.path.join(path, "state"))
    with open(os.path.join(path, "state", "partial"), "wb") as f:
      f.write(b"\0" * 1000)
  reader = checkpoint.Checkpointer(str(wd), keep=3)  # evaluate / sample: may run beside a live trainer
  assert reader.latest_step() == 3
  reader.close()
  assert all(os.path.isdir(p) for p in stale)
  trainer = checkpoint.Checkpointer(str(wd), keep=3, cleanup_tmp=True)  # holds the workdir lock
  trainer.close()
  assert not any(os.path.exists(p) for p in stale)
  assert finalized_steps(wd) == [1, 2, 3]
  got = restore_every_checkpoint(wd, cfg)
  for step in (1, 2, 3):
    for a, b in zip(got[step], leaves[step]):
      np.testing.assert_array_equal(a, b)
