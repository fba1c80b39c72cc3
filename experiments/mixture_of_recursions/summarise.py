"""Table of the Mixture-of-Recursions runs: final eval loss (nats/byte) and router statistics, mean +- std
over seeds, and each run's steps, training FLOPs and train tokens/s.

  python experiments/mixture_of_recursions/summarise.py runs/mixture_of_recursions
Reads OUTDIR/<variant>_s<seed>/{metrics.jsonl,config.json}; writes OUTDIR/results.jsonl.
"""
import collections, glob, json, os, sys

import numpy as np

out_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/mixture_of_recursions"


def flops_per_token(workdir: str) -> float:
  """Training FLOPs per token of a run (active FLOPs under routers)."""
  from recursive_lm import checkpoint
  from recursive_lm.analysis.accounting import flops_per_token as count
  cfg = checkpoint.load_config(workdir)
  return count(cfg, cfg.data.seq_len)


records, by_variant = [], collections.defaultdict(list)
for path in sorted(glob.glob(os.path.join(out_dir, "*_s*", "metrics.jsonl"))):
  wd = os.path.dirname(path)
  run = os.path.basename(wd)
  rows = [json.loads(l) for l in open(path)]
  evals = [r for r in rows if "eval_loss" in r]
  train = [r for r in rows if "loss" in r and "eval_loss" not in r]
  if not evals:
    continue
  last = train[-1] if train else {}
  cfg = json.load(open(os.path.join(wd, "config.json")))
  steps, tokens = evals[-1]["step"], cfg["data"]["batch_size"] * cfg["data"]["seq_len"]
  rec = {"run": run, "variant": run.rsplit("_s", 1)[0], "steps": steps, "eval_loss": evals[-1]["eval_loss"],
         "train_flops": flops_per_token(wd) * tokens * steps,
         "tokens_per_s": float(np.median([r["tokens_per_sec"] for r in train[1:]] or [np.nan])),
         "router_depth_frac": last.get("router/depth_frac")}
  records.append(rec)
  by_variant[rec["variant"]].append(rec)
with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
  for r in records:
    f.write(json.dumps(r) + "\n")
print("| variant | seeds | steps | train PFLOPs | eval loss (nats/byte) | tokens/s (median) |")
print("|---|---|---|---|---|---|")
for variant, rs in by_variant.items():
  loss = np.array([r["eval_loss"] for r in rs])
  print(f"| {variant} | {len(rs)} | {rs[0]['steps']} | {rs[0]['train_flops'] / 1e15:.4f} | "
        f"{loss.mean():.3f} +- {loss.std():.3f} | {np.median([r['tokens_per_s'] for r in rs]):.0f} |")
print("\n| run | eval loss | router depth fractions (0..R recursions, last logged step) |")
print("|---|---|---|")
for r in records:
  frac = r["router_depth_frac"]
  print(f"| {r['run']} | {r['eval_loss']:.3f} | {'-' if frac is None else ' / '.join(f'{x:.2f}' for x in frac)} |")
