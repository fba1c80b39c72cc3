"""Per-length exact-match accuracy of every run under OUTDIR, plus test-time loops for looped runs.

  python experiments/looped_algorithmic/analyse.py runs/looped_algorithmic [N_EXAMPLES]
Writes OUTDIR/results.jsonl (one record per run) and prints a markdown table.
"""
import glob, json, os, sys

from absl import logging

from recursive_lm.data.synthetic import parse_lengths
from recursive_lm.evaluate import accuracy_by_length
from recursive_lm.checkpoint import load_model as load_checkpoint

logging.set_verbosity(logging.WARNING)
out_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/looped_algorithmic"
n_ex = int(sys.argv[2]) if len(sys.argv) > 2 else 512
records = []
for wd in sorted(d for d in glob.glob(os.path.join(out_dir, "*_s*")) if os.path.isdir(d)):
  cfg, model, step = load_checkpoint(wd)
  tr, ev = parse_lengths(cfg.data.train_lengths), parse_lengths(cfg.data.eval_lengths)
  acc = accuracy_by_length(model, cfg, tr + ev, n_ex)
  rec = {"run": os.path.basename(wd), "step": int(step), "plan": cfg.model.plan.preset,
         "depth": cfg.model.plan.num_layers, "acc": acc,
         "train_mean": sum(acc[n] for n in tr) / len(tr), "heldout_mean": sum(acc[n] for n in ev) / len(ev)}
  if cfg.model.plan.preset == "looped":
    rec["loops"] = {}
    for loops in (1, 2, 3, 4, 6, 8, 12):
      a = accuracy_by_length(model, cfg, tr + ev, n_ex, loops=loops)
      rec["loops"][loops] = {"train_mean": sum(a[n] for n in tr) / len(tr),
                             "heldout_mean": sum(a[n] for n in ev) / len(ev), "acc": a}
  records.append(rec)
  print(json.dumps({k: v for k, v in rec.items() if k != "loops"}), flush=True)
with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
  for r in records:
    f.write(json.dumps(r) + "\n")
lengths = sorted(records[0]["acc"])
print("| run | " + " | ".join(f"n={n}" for n in lengths) + " | train mean | held-out mean |")
print("|---|" + "---|" * (len(lengths) + 2))
for r in records:
  print(f"| {r['run']} | " + " | ".join(f"{r['acc'][n]:.2f}" for n in lengths) +
        f" | {r['train_mean']:.3f} | {r['heldout_mean']:.3f} |")
for r in records:
  if "loops" in r:
    print(f"\n{r['run']} (trained with {r['depth']} loops): loops at test time -> train mean / held-out mean")
    for l, v in r["loops"].items():
      print(f"  loops={l}: {v['train_mean']:.3f} / {v['heldout_mean']:.3f}")
