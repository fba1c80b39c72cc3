"""Summarise runs/equal_budget/results.jsonl into a markdown table (mean +- std over seeds)."""
import collections, json, statistics, sys

path = (sys.argv[1] if len(sys.argv) > 1 else "runs/equal_budget") + "/results.jsonl"
rows = [json.loads(l) for l in open(path)]
by = collections.OrderedDict()
for r in rows:
  by.setdefault(r["name"], []).append(r)
print("| plan | unique blocks | params | FLOPs/token | seeds | eval bits/byte (mean ± std) | per seed | s/run |")
print("|---|---|---|---|---|---|---|---|")
for name, rs in by.items():
  b = [r["bpb"] for r in rs]
  sd = statistics.stdev(b) if len(b) > 1 else float("nan")
  print(f"| {name} | {rs[0]['unique_blocks']} | {rs[0]['params']:,} | {rs[0].get('flops_per_token', 0):,} | {len(rs)} | {statistics.mean(b):.3f} ± {sd:.3f} | "
        f"{', '.join(f'{x:.3f}' for x in b)} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
