"""Table of `benchmark generate --gen_exit RULE` records: per exit rule, mean +- std over seeds.

  python experiments/early_exit/summarise_depthwise.py DIR      # DIR/exit_s<seed>_<rule>.json
"""
import collections, glob, json, os, sys

import numpy as np

FIELDS = [("static_tokens_per_s", "static tok/s", 0), ("continuous_tokens_per_s", "engine all loops tok/s", 0),
          ("exit_static_tokens_per_s", "exit_static tok/s", 0),
          ("exit_depthwise_tokens_per_s", "exit_depthwise tok/s", 0), ("depthwise_vs_static", "depthwise_vs_static", 2),
          ("depthwise_vs_all_loops", "exit_depthwise / engine all loops", 2),
          ("mean_exit_loop", "mean exit loop", 2), ("greedy_agreement_with_full_depth", "agreement", 3),
          ("eval_loss", "eval loss", 3), ("eval_loss_with_exits", "with exits", 3)]

by_rule = collections.defaultdict(list)
for path in sorted(glob.glob(os.path.join(sys.argv[1], "exit_s*_*.json"))):
  rec = json.load(open(path))
  rec["depthwise_vs_all_loops"] = rec["exit_depthwise_tokens_per_s"] / rec["continuous_tokens_per_s"]
  by_rule[rec["exit"]].append((os.path.basename(path).split("_")[1], rec))
print("| exit rule | seeds | " + " | ".join(name for _, name, _ in FIELDS) + " |")
print("|---|---|" + "---|" * len(FIELDS))
for rule, recs in by_rule.items():
  cells = []
  for key, _, digits in FIELDS:
    v = np.array([r[key] for _, r in recs], float)
    cells.append(f"{v.mean():.{digits}f} +- {v.std():.{digits}f}")
  print(f"| {rule} | {len(recs)} | " + " | ".join(cells) + " |")
print("\n| run | exit rule | " + " | ".join(name for _, name, _ in FIELDS) + " |")
print("|---|---|" + "---|" * len(FIELDS))
for rule, recs in by_rule.items():
  for seed, r in recs:
    print(f"| {seed} | {rule} | " + " | ".join(f"{r[k]:.{d}f}" for k, _, d in FIELDS) + " |")
