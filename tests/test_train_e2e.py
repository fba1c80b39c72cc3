"""End to end through the real entry points, on a tiny relaxed recursive model
(cycle plan, 4 effective layers = 2 blocks x 2 repeats, LoRA rank 2) and a
100 kB slice of the stdlib corpus:

  train (in-process `train.run`, 8 simulated devices, data-parallel mesh)
  -> checkpoints -> `python -m recursive_lm.evaluate` -> `python -m recursive_lm.sample`;
  preemption + resume reproduces the uninterrupted run bit for bit (model,
  optimiser, schedule and grain data position all restored);
  a workdir holding another model is refused without touching it;
  the train CLI rejects unknown / mistyped config overrides with one line.

Run A (12 steps, uninterrupted) is trained once per module and shared.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from recursive_lm import config as config_lib
from recursive_lm import data, metrics
from recursive_lm.config import ConfigError

import tiny_run

STEPS, STOP_AT = 12, 5
TIMING_KEYS = ("tokens_per_sec", "mfu")  # wall-clock dependent; everything else must reproduce exactly

TINY_ARG = "batch=8,steps=12,eval_every=6,checkpoint_every=4,eval_batches=2"
TINY_FILE = f"{tiny_run.PATH}:{TINY_ARG}"


def tiny(**overrides):
  return config_lib.load(tiny_run.config(TINY_ARG, **overrides))


def subprocess_env():
  """One CPU device in the children, whatever the test process simulates."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def start(module, *args):
  """`python -m module args...` in the background (the CLIs overlap with each other and with in-process work)."""
  return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=subprocess_env())


def finish(proc):
  stdout, stderr = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def cli(module, *args):
  return finish(start(module, *args))


def train_records(workdir):
  return [r for r in metrics.read(workdir) if "loss" in r]


def eval_records(workdir):
  return [r for r in metrics.read(workdir) if "eval_loss" in r]


def snapshot(workdir):
  """Every file under workdir with its size, mtime and (small files) contents."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(root, f)
      st = os.stat(p)
      with open(p, "rb") as fh:
        body = fh.read() if st.st_size < 1 << 16 else None
      out[os.path.relpath(p, workdir)] = (st.st_size, st.st_mtime_ns, body)
  return out


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  from recursive_lm import train
  workdir = str(tmp_path_factory.mktemp("run_a"))
  summary = train.run(tiny(), workdir)
  return workdir, summary


def test_train_then_evaluate_and_sample_clis(run_a):
  workdir, summary = run_a
  cfg = tiny()
  # Training wrote what it promised.
  assert config_lib.from_json(open(os.path.join(workdir, "config.json")).read()) == cfg
  ckpts = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert ckpts == [8, 12]  # checkpoint_every 4, keep_checkpoints 2
  train_recs, evals = train_records(workdir), eval_records(workdir)
  assert [r["step"] for r in train_recs] == list(range(1, STEPS + 1))
  assert [r["step"] for r in evals] == [6, 12]
  assert all(math.isfinite(r["loss"]) for r in train_recs)
  assert train_recs[-1]["loss"] < train_recs[0]["loss"]  # it learns something in 12 steps
  assert summary["eval"] == evals[-1]

  prompt = "def __init__(self"
  evaluating = start("recursive_lm.evaluate", "--workdir", workdir)
  sampling = start("recursive_lm.sample", "--workdir", workdir, "--prompt", prompt, "--max_new_tokens", "12")

  # Meanwhile, the greedy continuation in-process (8 simulated devices here, model on one).
  from recursive_lm import checkpoint
  from recursive_lm.inference import generate
  _, model, step = checkpoint.load_model(workdir)
  assert step == STEPS
  tok = data.get_tokenizer(cfg.data.tokenizer)
  expected_text = tok.decode(np.asarray(generate(model, tok.encode(prompt)[None], 12)[0]))

  # Evaluate the latest checkpoint on one device: the same batches give the same loss.
  res = finish(evaluating)
  assert res.returncode == 0, res.stderr
  # The console carries the result only; orbax's restore records went to the workdir's log.
  assert res.stderr == ""
  assert "checkpoint" in open(os.path.join(workdir, "logs", "evaluate.log")).read().lower()
  lines = res.stdout.strip().splitlines()
  assert len(lines) == 1, res.stdout
  out = json.loads(lines[0])
  assert {"eval_loss", "bits_per_byte", "step", "tokens"} <= set(out)
  assert out["step"] == STEPS
  assert out["tokens"] == cfg.train.eval_batches * cfg.data.batch_size * cfg.data.seq_len
  assert out["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5, abs=1e-5)
  assert out["bits_per_byte"] == pytest.approx(out["eval_loss"] / math.log(2), rel=1e-12)
  assert out["bits_per_byte"] == pytest.approx(evals[-1]["eval_bits_per_byte"], rel=1e-5, abs=1e-5)

  # Greedy sampling through the CLI gives the in-process text.
  res = finish(sampling)
  assert res.returncode == 0, res.stderr
  assert res.stdout.startswith(prompt)
  assert res.stdout == expected_text + "\n"


def test_cli_errors_are_one_line(run_a, tmp_path):
  workdir, _ = run_a
  # Through the CLIs: one before anything loads, one only found after the
  # checkpoint is restored (orbax's INFO logging must not bury it).
  cases = [
      (("recursive_lm.evaluate", "--workdir", str(tmp_path / "missing")), "missing"),
      (("recursive_lm.sample", "--workdir", workdir, "--prompt", "x" * 60, "--max_new_tokens", "5"), "max_seq_len"),
  ]
  procs = [start(*args) for args, _ in cases]
  for (args, needle), proc in zip(cases, procs):
    res = finish(proc)
    assert res.returncode == 2, (args, res.stdout, res.stderr)
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0], (args, res.stderr)
    assert res.stdout == ""
  # The other checks behind the same exit-2 path, in-process.
  from recursive_lm import evaluate, sample
  with pytest.raises(ConfigError, match="config.json"):
    evaluate.run(str(tmp_path))
  with pytest.raises(ConfigError, match="--step=3"):
    evaluate.run(workdir, step=3)
  with pytest.raises(ConfigError, match="--batches=0"):
    evaluate.run(workdir, n_batches=0)
  with pytest.raises(ConfigError, match="no tokens"):
    sample.sample(workdir, "", 4)


def test_resume_is_bit_exact(run_a, tmp_path):
  from recursive_lm import train
  wd_a, _ = run_a
  wd_b = str(tmp_path / "run_b")
  cfg = tiny()
  first = train.run(cfg, wd_b, stop_at=STOP_AT)
  assert first["train"]["step"] == STOP_AT
  assert sorted(int(d) for d in os.listdir(os.path.join(wd_b, "checkpoints")) if d.isdigit()) == [4, 5]

  # The data position saved with step 5: the next batch is the 6th batch of a fresh pipeline.
  iter_dir = os.path.join(wd_b, "checkpoints", str(STOP_AT), "data_iter")
  (state_file,) = [f for f in os.listdir(iter_dir) if f.endswith(".json")]
  with open(os.path.join(iter_dir, state_file)) as f:
    saved = json.load(f)
  fresh = data.train_iterator(cfg.data, cfg.seed)
  for _ in range(STOP_AT):
    next(fresh)
  resumed = data.train_iterator(cfg.data, cfg.seed)
  resumed.set_state(saved)
  expected, got = next(fresh), next(resumed)
  for k in ("inputs", "targets"):
    np.testing.assert_array_equal(got[k], expected[k])

  train.run(cfg, wd_b)  # resumes from step 5
  a, b = metrics.read(wd_a), metrics.read(wd_b)
  strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]
  # Exactly one record per logged step and eval, in order, despite the restart.
  assert [(r["step"], "loss" in r) for r in b] == [(r["step"], "loss" in r) for r in a]
  # Bit-for-bit: losses, norms, learning rates, token counts, per-depth stats and evals.
  for ra, rb in zip(strip(a), strip(b)):
    assert ra == rb, (ra, rb)
  assert [r["loss"] for r in train_records(wd_b)][STOP_AT:] == [r["loss"] for r in train_records(wd_a)][STOP_AT:]


def test_workdir_with_another_model_is_refused(run_a):
  from recursive_lm import train
  workdir, _ = run_a
  before = snapshot(workdir)
  with pytest.raises(ConfigError, match=r"model\.d_model"):
    train.run(tiny(**{"model.d_model": 48}), workdir)
  assert snapshot(workdir) == before


def test_train_cli_rejects_bad_overrides(tmp_path):
  cases = (("--config.model.nonexistent=1", "nonexistent"), ("--config.train.steps=abc", "abc"))
  procs = [start("recursive_lm.train", "--config", TINY_FILE, "--workdir", str(tmp_path / "wd"), override)
           for override, _ in cases]
  for (override, needle), proc in zip(cases, procs):
    res = finish(proc)
    assert res.returncode != 0, res.stdout
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0], res.stderr
    assert not (tmp_path / "wd").exists()


BROKEN_CONFIGS = {  # file body -> what the one error line must name
    None: "no such file",
    "def get_config(:\n": "line 1",
    "SIZE = 3\n": "defines no get_config",
    "def get_config(arg=None):\n  return undefined_name\n": "NameError",
}


def test_clis_reject_missing_or_broken_config_files(tmp_path):
  """Every CLI that takes --config answers a bad file with one error line and exit 2, creating nothing."""
  runs = []
  for i, (body, needle) in enumerate(BROKEN_CONFIGS.items()):
    path = tmp_path / f"config_{i}.py"
    if body is not None:
      path.write_text(body)
    runs.append((start("recursive_lm.train", "--config", f"{path}:tiny", "--workdir", str(tmp_path / "wd")),
                 path, needle))
  missing = tmp_path / "does_not_exist.py"
  runs += [(start("recursive_lm.describe", f"--config={missing}"), missing, "no such file"),
           (start("recursive_lm.benchmark", "train", "--config", str(missing)), missing, "no such file")]
  for proc, path, needle in runs:
    res = finish(proc)
    assert res.returncode == 2, (path, res.stdout, res.stderr)
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --config ") and str(path) in err[0] and needle in err[0], \
        res.stderr
  assert not (tmp_path / "wd").exists()
  # A run directory whose config.json is damaged: the read-only CLIs say so in one line.
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  (damaged / "config.json").write_text("{not json")
  res = cli("recursive_lm.evaluate", "--workdir", str(damaged))
  assert res.returncode == 2 and res.stderr.count("\n") == 1 and "config.json: not a recursive_lm config" in res.stderr


@pytest.mark.slow
def test_train_cli_runs_and_resumes(tmp_path):
  wd = tmp_path / "wd"
  base = ("recursive_lm.train", "--config", TINY_FILE, "--workdir", str(wd), "--config.train.eval_every=2")
  res = cli(*base, "--config.train.steps=2")
  assert res.returncode == 0, res.stderr
  # The console: the project's own lines only; library records (orbax, jax) are in logs/train.log.
  assert res.stderr == ""
  assert all(line.startswith(("step ", "eval step", "done:", "final eval:")) for line in res.stdout.splitlines()), \
      res.stdout
  assert "CheckpointManager" in (wd / "logs" / "train.log").read_text()
  res = cli(*base, "--config.train.steps=3")  # same model: resumes from step 2
  assert res.returncode == 0, res.stderr
  assert "resumed from step 2" in res.stdout
  assert [r["step"] for r in train_records(str(wd))] == [1, 2, 3]
