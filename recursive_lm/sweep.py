"""Run a grid of arms x seeds at a matched budget and tabulate them with intervals:
`python -m recursive_lm.sweep GRID.py [--workers N] [--out DIR]`.

A grid file is a Python module with `get_grid()` returning a dict:

  arms:      {name: {"config": "configs/relaxed.py:size=tiny", "overrides": {"model.d_model": 40}}}
  seeds:     [0, 1, 2]
  baseline:  the arm every other arm is compared with (paired over seeds)
  common:    overrides applied to every arm (e.g. {"train.steps": 200}); optional
  budget:    optional; {"kind": "total_params" | "active_params" | "train_flops",
              "target": a number, or "baseline" (the baseline arm's count),
              "field": the integer width to solve for (e.g. "model.mlp_dim"),
              "range": (lo, hi) inclusive, "tolerance": relative (default 0.01),
              "arms": names to match (default: every arm but the baseline)}
  eval_tokens: validation tokens per evaluation (default 1_000_000, or the whole
              split when smaller), spread over the whole split (evaluate --tokens)

Budgets are counted by recursive_lm.analysis.accounting from shapes only; the
width is found by bisection over the integers in range (the counts grow with
every width field). Each (arm, seed) is its own run directory OUT/runs/ARM_sSEED,
trained and evaluated by subprocesses of `python -m recursive_lm.train` and
`python -m recursive_lm.evaluate` (the user's own path); a run with
result.json is complete and skipped, a half-trained one resumes from its
checkpoint. A run that fails marks its arm failed; the others go on.

Writes OUT/results.jsonl (one record per run), OUT/results.md (per arm mean +-
std over seeds, paired difference against the baseline with a 95 % t-interval
over seeds, params, FLOPs, tokens/s) and OUT/results.png. Bad input: one
`error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time

from recursive_lm.config import ConfigError

BUDGET_KINDS = ("total_params", "active_params", "train_flops")
DEFAULT_EVAL_TOKENS = 1_000_000

# Two-sided 95 % Student t quantiles t_{0.975, df}; beyond 30 the normal's 1.96 is within 2 %.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def t975(df: int) -> float:
  return _T975.get(df, 1.96)


@dataclasses.dataclass
class Arm:
  name: str
  config: str                      # FILE[:ARG]
  overrides: dict                  # dotted key -> value (common ones included)
  match: dict | None = None        # {"field", "value", "count", "target", "kind"} once matched


def _load_module(path: str, what: str):
  if not os.path.isfile(path):
    raise ConfigError(f"{what} {path}: no such file")
  spec = importlib.util.spec_from_file_location(f"_rlm_{what}_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a broken file: name it and the error in one line
    raise ConfigError(f"{what} {path}: {type(e).__name__}: {e}") from None
  return module


def arm_config(arm: Arm, overrides: dict | None = None):
  """The validated Config of an arm (its config file, then its overrides); ConfigError names the arm."""
  from recursive_lm import config as config_lib
  path, _, arg = arm.config.partition(":")
  module = _load_module(path, "config")
  if not hasattr(module, "get_config"):
    raise ConfigError(f"arm {arm.name}: {path} defines no get_config()")
  cd = module.get_config(arg or None)
  for key, value in {**arm.overrides, **(overrides or {})}.items():
    node = cd
    parts = key.split(".")
    try:
      for p in parts[:-1]:
        node = node[p]
      if parts[-1] not in node:
        raise KeyError(key)
      node[parts[-1]] = value
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(f"arm {arm.name}: unknown config key {key!r}") from None
  try:
    return config_lib.load(cd)
  except ConfigError as e:
    raise ConfigError(f"arm {arm.name}: {e}") from None


def budget_count(cfg, kind: str) -> float:
  """The budget of a Config from parameter shapes (accounting; nothing allocated)."""
  from recursive_lm.analysis import accounting
  if kind == "total_params":
    return accounting.count_params(accounting.abstract_model(cfg))["total_params"]
  if kind == "active_params":
    return accounting.matmul_params_per_token(cfg, seq_len=cfg.data.seq_len)
  tokens = cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len
  return accounting.flops_per_token(cfg, cfg.data.seq_len) * tokens


def match_width(arm: Arm, kind: str, target: float, field: str, lo: int, hi: int, tolerance: float) -> dict:
  """Solve for the integer `field` in [lo, hi] whose budget is within `tolerance` (relative) of target.

  Bisection for the smallest width whose count reaches the target (counts grow
  with width), then the closer of it and its neighbour below. Returns
  {"field", "value", "count", "target", "kind", "rel_error"}; ConfigError naming
  the closest width reached when none is within tolerance.
  """
  cache = {}

  def count(v: int) -> float:
    if v not in cache:
      cache[v] = budget_count(arm_config(arm, {field: v}), kind)
    return cache[v]

  a, b = lo, hi
  if count(b) < target:
    a = b
  else:
    while a < b:  # invariant: count(b) >= target
      mid = (a + b) // 2
      if count(mid) >= target:
        b = mid
      else:
        a = mid + 1
  candidates = [v for v in (a - 1, a) if lo <= v <= hi]
  best = min(candidates, key=lambda v: abs(count(v) - target))
  rel = (count(best) - target) / target
  if abs(rel) > tolerance:
    raise ConfigError(f"arm {arm.name}: no {field} in [{lo}, {hi}] matches {kind}={target:.6g} within "
                      f"{tolerance:.2%}; closest is {field}={best} with {count(best):.6g} ({rel:+.2%})")
  return {"kind": kind, "field": field, "value": best, "count": count(best), "target": target, "rel_error": rel}


@dataclasses.dataclass
class Grid:
  arms: dict[str, Arm]
  seeds: list[int]
  baseline: str
  eval_tokens: int
  budget: dict | None


def load_grid(path: str) -> Grid:
  """Read and check a grid file, matching budgets; ConfigError (one line) on bad input."""
  module = _load_module(path, "grid")
  if not hasattr(module, "get_grid"):
    raise ConfigError(f"grid {path}: defines no get_grid()")
  g = module.get_grid()
  unknown = set(g) - {"arms", "seeds", "baseline", "common", "budget", "eval_tokens"}
  if unknown:
    raise ConfigError(f"grid {path}: unknown keys {sorted(unknown)}")
  if not g.get("arms"):
    raise ConfigError(f"grid {path}: no arms")
  common = dict(g.get("common", {}))
  arms = {}
  for name, spec in g["arms"].items():
    if "config" not in spec:
      raise ConfigError(f"arm {name}: no 'config'")
    arms[name] = Arm(name, spec["config"], {**common, **spec.get("overrides", {})})
  baseline = g.get("baseline")
  if baseline not in arms:
    raise ConfigError(f"baseline {baseline!r} is not an arm (arms: {', '.join(arms)})")
  seeds = [int(s) for s in g.get("seeds", [0])]
  for arm in arms.values():  # unknown keys and invalid values, named with the arm, before anything runs
    arm_config(arm)
  budget = g.get("budget")
  if budget:
    kind = budget.get("kind")
    if kind not in BUDGET_KINDS:
      raise ConfigError(f"budget kind {kind!r} must be one of {', '.join(BUDGET_KINDS)}")
    target = budget.get("target", "baseline")
    if target == "baseline":
      target = budget_count(arm_config(arms[baseline]), kind)
    lo, hi = budget["range"]
    for name in budget.get("arms", [n for n in arms if n != baseline]):
      if name not in arms:
        raise ConfigError(f"budget arm {name!r} is not an arm")
      arm = arms[name]
      arm.match = match_width(arm, kind, float(target), budget["field"], int(lo), int(hi),
                              float(budget.get("tolerance", 0.01)))
      arm.overrides[budget["field"]] = arm.match["value"]
  return Grid(arms, seeds, baseline, int(g.get("eval_tokens", DEFAULT_EVAL_TOKENS)), budget)


def _flag_value(v) -> str:
  if isinstance(v, (tuple, list)):
    return ",".join(str(x) for x in v)
  return str(v)


def train_command(arm: Arm, seed: int, workdir: str) -> list[str]:
  cmd = [sys.executable, "-m", "recursive_lm.train", "--config", arm.config, "--workdir", workdir,
         f"--config.seed={seed}"]
  return cmd + [f"--config.{k}={_flag_value(v)}" for k, v in arm.overrides.items()]


def _last_train_record(workdir: str) -> dict:
  out = {}
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        try:
          r = json.loads(line)
        except ValueError:
          continue
        if "loss" in r:
          out = r
  except OSError:
    pass
  return out


def run_one(arm: Arm, seed: int, out: str, eval_tokens: int, accounts: dict) -> dict:
  """Train and evaluate one (arm, seed) through the CLIs; returns (and stores) its record.

  A run whose result.json exists is complete: it is read back, nothing runs."""
  workdir = os.path.join(out, "runs", f"{arm.name}_s{seed}")
  done = os.path.join(workdir, "result.json")
  if os.path.exists(done):
    with open(done) as f:
      return {**json.load(f), "skipped": True}
  os.makedirs(workdir, exist_ok=True)
  record = {"arm": arm.name, "seed": seed, "workdir": workdir, **accounts}
  log = os.path.join(out, "logs", f"{arm.name}_s{seed}.log")
  os.makedirs(os.path.dirname(log), exist_ok=True)
  started = time.time()
  with open(log, "a") as lf:
    proc = subprocess.run(train_command(arm, seed, workdir), stdout=lf, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
      return {**record, "status": "failed", "error": f"train exit {proc.returncode} (see {log})"}
    ev = subprocess.run([sys.executable, "-m", "recursive_lm.evaluate", "--workdir", workdir,
                         f"--tokens={eval_tokens}"], stdout=subprocess.PIPE, stderr=lf, text=True)
  if ev.returncode != 0:
    return {**record, "status": "failed", "error": f"evaluate exit {ev.returncode} (see {log})"}
  e = json.loads(ev.stdout.strip().splitlines()[-1])
  record.update(status="ok", eval_loss=e["eval_loss"], bits_per_byte=e.get("bits_per_byte"),
                eval_tokens=e["tokens"], step=e["step"],
                tokens_per_sec=_last_train_record(workdir).get("tokens_per_sec"),
                seconds=round(time.time() - started, 1))
  with open(done + ".tmp", "w") as f:  # written last and atomically: its presence means complete
    json.dump(record, f)
  os.replace(done + ".tmp", done)
  return record


def accounts_of(arm: Arm) -> dict:
  cfg = arm_config(arm)
  out = {k: budget_count(cfg, k) for k in BUDGET_KINDS}
  out["flops_per_token"] = out["train_flops"] / (cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len)
  if arm.match:
    out["matched"] = arm.match
  return out


# ---- statistics -------------------------------------------------------------------------------------------

def mean_std(xs: list[float]) -> tuple[float, float]:
  m = sum(xs) / len(xs)
  sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
  return m, sd


def paired_interval(arm: dict[int, float], base: dict[int, float]) -> tuple[float, float, float, int]:
  """Mean of arm - baseline over their common seeds, with its 95 % t-interval: (mean, lo, hi, n).

  Pairing by seed removes the variance the seed shares (data order, init) from the comparison."""
  seeds = sorted(set(arm) & set(base))
  d = [arm[s] - base[s] for s in seeds]
  if not d:
    return float("nan"), float("nan"), float("nan"), 0
  m, sd = mean_std(d)
  half = t975(len(d) - 1) * sd / math.sqrt(len(d)) if len(d) > 1 else float("nan")
  return m, m - half, m + half, len(d)


def summarise(records: list[dict], baseline: str, metric: str = "eval_loss") -> list[dict]:
  """One row per arm (in first-seen order): n, mean, std, paired difference against the baseline."""
  arms = list(dict.fromkeys(r["arm"] for r in records))
  by = {a: {r["seed"]: r[metric] for r in records if r["arm"] == a and r.get("status") == "ok"} for a in arms}
  rows = []
  for a in arms:
    rs = [r for r in records if r["arm"] == a]
    failed = [r["seed"] for r in rs if r.get("status") != "ok"]
    vals = list(by[a].values())
    m, sd = mean_std(vals) if vals else (float("nan"), float("nan"))
    d = paired_interval(by[a], by.get(baseline, {})) if a != baseline else (0.0, 0.0, 0.0, len(vals))
    tps = [r["tokens_per_sec"] for r in rs if r.get("tokens_per_sec")]
    rows.append({"arm": a, "n": len(vals), "failed_seeds": failed, "mean": m, "std": sd, "diff": d[0],
                 "diff_lo": d[1], "diff_hi": d[2], "total_params": rs[0].get("total_params"),
                 "active_params": rs[0].get("active_params"), "flops_per_token": rs[0].get("flops_per_token"),
                 "tokens_per_sec": sum(tps) / len(tps) if tps else None, "matched": rs[0].get("matched")})
  return rows


def markdown(rows: list[dict], baseline: str, metric: str = "eval_loss") -> str:
  def f(x, p=4):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{p}f}"
  lines = [f"| arm | seeds | {metric} mean ± std | Δ vs {baseline} [95 % CI] | params | active params | "
           "FLOPs/token | tokens/s | matched |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    status = str(r["n"]) + (f" (failed: {', '.join(map(str, r['failed_seeds']))})" if r["failed_seeds"] else "")
    diff = "baseline" if r["arm"] == baseline else f"{f(r['diff'])} [{f(r['diff_lo'])}, {f(r['diff_hi'])}]"
    m = r["matched"]
    matched = f"{m['field']}={m['value']} ({m['kind']} {m['count']:.4g}, {m['rel_error']:+.2%})" if m else ""
    tps = f"{r['tokens_per_sec']:.0f}" if r["tokens_per_sec"] else "—"
    lines.append(f"| {r['arm']} | {status} | {f(r['mean'])} ± {f(r['std'])} | {diff} | {r['total_params']} | "
                 f"{f(r['active_params'], 0)} | {r['flops_per_token']:.4g} | {tps} | {matched} |")
  return "\n".join(lines) + "\n"


def figure(rows: list[dict], records: list[dict], baseline: str, path: str) -> None:
  """Eval loss by arm (mean, 95 % t-interval over seeds) and the runs' eval-loss curves."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ok = [r for r in rows if r["n"]]
  half = [t975(r["n"] - 1) * r["std"] / math.sqrt(r["n"]) if r["n"] > 1 else 0 for r in ok]
  ax1.errorbar(range(len(ok)), [r["mean"] for r in ok], yerr=half, fmt="o", capsize=4)
  ax1.set_xticks(range(len(ok)), [r["arm"] for r in ok], rotation=30, ha="right")
  ax1.set_ylabel("eval loss (nats/token)")
  ax1.set_title("mean ± 95 % t-interval over seeds")
  colors = {r["arm"]: f"C{i}" for i, r in enumerate(rows)}
  for rec in records:
    if rec.get("status") != "ok":
      continue
    steps, losses = [], []
    try:
      with open(os.path.join(rec["workdir"], "metrics.jsonl")) as fh:
        for line in fh:
          m = json.loads(line)
          if "loss" in m:
            steps.append(m["step"])
            losses.append(m["loss"])
    except (OSError, ValueError):
      continue
    ax2.plot(steps, losses, color=colors[rec["arm"]], alpha=0.6,
             label=rec["arm"] if rec["seed"] == min(r["seed"] for r in records if r["arm"] == rec["arm"]) else None)
  ax2.set_xlabel("step")
  ax2.set_ylabel("train loss")
  ax2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(records: list[dict], baseline: str, out: str) -> list[dict]:
  records = sorted(records, key=lambda r: (r["arm"] != baseline, r["arm"], r["seed"]))
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps({k: v for k, v in r.items() if k != "skipped"}) + "\n")
  rows = summarise(records, baseline)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(markdown(rows, baseline))
  figure(rows, records, baseline, os.path.join(out, "results.png"))
  return rows


def run_sweep(grid: Grid, out: str, workers: int = 1, log=print) -> list[dict]:
  os.makedirs(out, exist_ok=True)
  accounts = {name: accounts_of(arm) for name, arm in grid.arms.items()}
  for name, arm in grid.arms.items():
    if arm.match:
      m = arm.match
      log(f"matched {name}: {m['field']}={m['value']} gives {m['kind']} {m['count']:.6g} "
          f"(target {m['target']:.6g}, {m['rel_error']:+.2%})")
  jobs = [(arm, s) for s in grid.seeds for arm in grid.arms.values()]
  records, lock, done = [], threading.Lock(), 0
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    futures = {pool.submit(run_one, arm, s, out, grid.eval_tokens, accounts[arm.name]): (arm, s) for arm, s in jobs}
    for fut in concurrent.futures.as_completed(futures):
      arm, s = futures[fut]
      try:
        r = fut.result()
      except Exception as e:  # a crash of ours for one run must not end the others
        r = {"arm": arm.name, "seed": s, "status": "failed", "error": f"{type(e).__name__}: {e}", **accounts[arm.name]}
      with lock:
        records.append(r)
        done += 1
        what = ("skipped (complete)" if r.get("skipped") else
                f"eval_loss {r['eval_loss']:.4f}" if r["status"] == "ok" else f"FAILED: {r['error']}")
        log(f"[{done}/{len(jobs)}] {arm.name} seed {s}: {what}")
  rows = write_outputs(records, grid.baseline, out)
  log(f"wrote {os.path.join(out, 'results.md')}, results.jsonl, results.png")
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m recursive_lm.sweep", description=__doc__.split("\n")[0])
  p.add_argument("grid")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--out", default=None, help="output directory (default: runs/sweep_<grid name>)")
  a = p.parse_args(argv)
  from recursive_lm import cli
  out = a.out or os.path.join("runs", "sweep_" + os.path.splitext(os.path.basename(a.grid))[0])
  try:
    grid = load_grid(a.grid)
    rows = run_sweep(grid, out, a.workers, log=lambda s: print(s, flush=True))
  except ConfigError as e:
    cli.fail(e)
  print(markdown(rows, grid.baseline), end="")
  return 1 if any(r["failed_seeds"] for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
