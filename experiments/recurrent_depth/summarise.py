"""Markdown table of eval loss (nats/byte) against test-time loops, mean +- std over seeds.

  python experiments/recurrent_depth/summarise.py runs/recurrent_depth
Reads OUTDIR/<variant>_s<seed>/loops.jsonl (written by run.sh) and writes OUTDIR/results.jsonl.
"""
import collections, glob, json, os, sys

import numpy as np

out_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/recurrent_depth"
runs = collections.defaultdict(list)  # variant -> [{loops: loss}] per seed
records = []
for path in sorted(glob.glob(os.path.join(out_dir, "*_s*", "loops.jsonl"))):
  run = os.path.basename(os.path.dirname(path))
  variant = run.rsplit("_s", 1)[0]
  with open(path) as f:
    losses = {r["loops"]: r["eval_loss"] for r in map(json.loads, f)}
  runs[variant].append(losses)
  records.append({"run": run, "variant": variant, "eval_loss": losses})
with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
  for r in records:
    f.write(json.dumps(r) + "\n")
loops = sorted(next(iter(runs.values()))[0])
print("| variant | seeds | " + " | ".join(f"r={r}" for r in loops) + " |")
print("|---|---|" + "---|" * len(loops))
for variant, seeds in runs.items():
  cells = []
  for r in loops:
    v = np.array([s[r] for s in seeds])
    cells.append(f"{v.mean():.3f} +- {v.std():.3f}")
  print(f"| {variant} | {len(seeds)} | " + " | ".join(cells) + " |")
print("\n| run | " + " | ".join(f"r={r}" for r in loops) + " | r=32 minus r=4 |")
print("|---|" + "---|" * (len(loops) + 1))
for r in records:
  e = r["eval_loss"]
  print(f"| {r['run']} | " + " | ".join(f"{e[k]:.3f}" for k in loops) + f" | {e[32] - e[4]:+.3f} |")
