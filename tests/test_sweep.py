"""recursive_lm.sweep: budget matching, the paired interval, grid errors, resume after a kill."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from recursive_lm import sweep
from recursive_lm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arm(name, config, **overrides):
  return sweep.Arm(name, os.path.join(ROOT, config), overrides)


@pytest.mark.parametrize("kind", ["total_params", "active_params", "train_flops"])
@pytest.mark.parametrize("config", ["configs/recursive.py:size=tiny,num_layers=4", "configs/relaxed.py:size=tiny",
                                    "configs/sandwich.py:size=tiny,num_layers=4"])
def test_matcher_reaches_tolerance(config, kind):
  """Three plans matched to vanilla-tiny's budget by mlp_dim: within 1 % and the count is the accounting's."""
  base = sweep.budget_count(sweep.arm_config(_arm("vanilla", "configs/vanilla.py:size=tiny,num_layers=4")), kind)
  arm = _arm("x", config)
  m = sweep.match_width(arm, kind, base, "model.mlp_dim", 4, 2048, 0.01)
  assert abs(m["count"] - base) / base <= 0.01
  assert m["count"] == sweep.budget_count(sweep.arm_config(arm, {"model.mlp_dim": m["value"]}), kind)
  # the neighbours are no closer: bisection found the best integer
  for v in (m["value"] - 1, m["value"] + 1):
    other = sweep.budget_count(sweep.arm_config(arm, {"model.mlp_dim": v}), kind)
    assert abs(other - base) >= abs(m["count"] - base)


def test_unmatchable_budget_names_closest():
  arm = _arm("relaxed", "configs/relaxed.py:size=tiny")
  with pytest.raises(ConfigError, match=r"arm relaxed: no model.mlp_dim in \[4, 16\].*closest is model.mlp_dim=16"):
    sweep.match_width(arm, "total_params", 1e9, "model.mlp_dim", 4, 16, 0.01)


FIXED = [  # eval losses by (arm, seed); hand computation below
    ("base", 0, 2.0), ("base", 1, 2.5), ("base", 2, 2.2),
    ("a", 0, 1.8), ("a", 1, 2.4), ("a", 2, 1.9),
]


def test_paired_interval_matches_hand_computation(tmp_path):
  path = tmp_path / "results.jsonl"
  path.write_text("".join(json.dumps({"arm": a, "seed": s, "status": "ok", "eval_loss": v, "total_params": 1,
                                      "active_params": 1, "flops_per_token": 6.0}) + "\n" for a, s, v in FIXED))
  records = [json.loads(l) for l in path.read_text().splitlines()]
  rows = {r["arm"]: r for r in sweep.summarise(records, "base")}
  d = [1.8 - 2.0, 2.4 - 2.5, 1.9 - 2.2]          # -0.2, -0.1, -0.3
  mean = sum(d) / 3                                # -0.2
  sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)  # 0.1
  half = 4.303 * sd / math.sqrt(3)                 # t_{0.975, 2}
  assert rows["a"]["diff"] == pytest.approx(-0.2)
  assert sd == pytest.approx(0.1)
  assert rows["a"]["diff_lo"] == pytest.approx(mean - half)
  assert rows["a"]["diff_hi"] == pytest.approx(mean + half)
  assert rows["base"]["mean"] == pytest.approx(6.7 / 3)
  table = sweep.markdown(list(rows.values()), "base")
  assert f"{mean - half:.4f}" in table and "baseline" in table


def _grid_file(tmp_path, arms, baseline="vanilla", extra=""):
  p = tmp_path / "grid.py"
  p.write_text(f"def get_grid():\n  return {{'arms': {arms!r}, 'seeds': [0, 1], 'baseline': {baseline!r},\n"
               f"    'common': {{'train.steps': 3, 'train.log_every': 1, 'train.eval_every': 3,\n"
               f"               'train.checkpoint_every': 3, 'train.eval_batches': 1}},\n"
               f"    'eval_tokens': 1000, {extra}}}\n")
  return str(p)


def _env():
  """The user's environment: one CPU device (the suite's 8 simulated ones would not divide tiny batches)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return env


def _cli(args, **kw):
  return subprocess.run([sys.executable, "-m", "recursive_lm.sweep", *args], cwd=ROOT, capture_output=True,
                        text=True, env=_env(), **kw)


VANILLA = {"config": "configs/vanilla.py:size=tiny"}


@pytest.mark.parametrize("arms,baseline,extra,message", [
    ({"vanilla": VANILLA, "bad": {"config": "configs/vanilla.py:size=tiny", "overrides": {"model.nope": 1}}},
     "vanilla", "", "error: arm bad: unknown config key 'model.nope'"),
    ({"vanilla": VANILLA}, "other", "", "error: baseline 'other' is not an arm"),
    ({"vanilla": VANILLA, "r": {"config": "configs/relaxed.py:size=tiny"}}, "vanilla",
     "'budget': {'kind': 'total_params', 'target': 10**9, 'field': 'model.mlp_dim', 'range': (4, 64)}",
     "error: arm r: no model.mlp_dim in [4, 64] matches total_params=1e+09"),
])
def test_invalid_grid_one_line(tmp_path, arms, baseline, extra, message):
  r = _cli([_grid_file(tmp_path, arms, baseline, extra), "--out", str(tmp_path / "out")])
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), r.stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_killed_sweep_resumes_without_repeating(tmp_path):
  """Kill the sweep (its whole process group) after the first run completes; the restart skips it."""
  grid = _grid_file(tmp_path, {"vanilla": VANILLA, "broken": {"config": "configs/vanilla.py:size=tiny",
                                                              "overrides": {"optim.lr": 1e9}}})
  out = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-m", "recursive_lm.sweep", grid, "--out", str(out)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=_env())
  first = out / "runs" / "vanilla_s0" / "result.json"
  deadline = time.time() + 240
  while not first.exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  assert first.exists(), proc.stdout.read() if proc.poll() is not None else "timeout"
  os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its train/evaluate children, mid-sweep
  proc.wait()
  stamp = first.stat().st_mtime_ns
  r = _cli([grid, "--out", str(out)], timeout=400)
  assert "vanilla seed 0: skipped (complete)" in r.stdout, r.stdout + r.stderr
  assert first.stat().st_mtime_ns == stamp
  assert r.returncode == 1  # the diverging arm failed; the sweep went on and wrote everything
  records = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
  assert sorted((x["arm"], x["seed"], x["status"]) for x in records) == [
      ("broken", 0, "failed"), ("broken", 1, "failed"), ("vanilla", 0, "ok"), ("vanilla", 1, "ok")]
  assert "failed: 0, 1" in (out / "results.md").read_text()
  assert (out / "results.png").stat().st_size > 0


def test_spread_batches_cover_the_whole_split():
  """evaluate --tokens: windows evenly spaced over the split (not its first batches); 0 is every window."""
  import numpy as np
  from recursive_lm import evaluate
  from recursive_lm.data.pipeline import TokenWindows, load_splits, window_bos
  cfg = sweep.arm_config(_arm("v", "configs/vanilla.py:size=tiny"))
  tok, _, val = load_splits(cfg.data)
  windows = TokenWindows(val, cfg.data.seq_len, window_bos(tok))
  n = len(windows)
  T, B = cfg.data.seq_len, cfg.data.batch_size
  every = evaluate.spread_batches(cfg.data, 0)
  assert sum(int((b["targets"] >= 0).sum()) for b in every) == n * T
  some = evaluate.spread_batches(cfg.data, 10 * T)
  rows = np.concatenate([b["inputs"][b["targets"][:, 0] >= 0] for b in some])
  assert len(rows) == 10 and all(b["inputs"].shape == (B, T) for b in some)
  want = [windows[int(i * n / 10)][:-1] for i in range(10)]
  np.testing.assert_array_equal(rows, np.stack(want))
  assert int(9 * n / 10) > n // 2  # the last rows come from the end of the split
