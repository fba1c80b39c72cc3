"""Train-step speed of expert-choice MoR against the recursive model of equal parameters.

  python experiments/mixture_of_recursions/speed.py --out experiments/mixture_of_recursions/speed.json

Runs `python -m recursive_lm.benchmark train --config configs/mor.py:...` (size small: d_model 192,
2 unique blocks x 3 recursions between a unique first and last block, batch 16 x 128) for the recursive
model (no routers) and for MoR at several capacity schedules, alternating the variants over --rounds
rounds so a busy machine slows all of them alike; per variant the best (lowest) median step time.
Reports per MoR variant: active FLOPs per token / the recursive model's (from the benchmark's
flops_per_token) and step time / the recursive model's; if the gathered execution saves compute in
proportion, the two ratios are equal.
"""
import argparse, json, os, subprocess, sys, tempfile

VARIANTS = {
    "recursive": "routing=none",
    "mor_1-1-1": "routing=expert,capacities=1-1-1",
    "mor_1-2/3-1/3": "routing=expert",
    "mor_2/3-2/3-2/3": "routing=expert,capacities=0.6667-0.6667-0.6667",
    "mor_1/3-1/3-1/3": "routing=expert,capacities=0.3334-0.3334-0.3334",
}


def bench(arg: str, steps: int) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    subprocess.run([sys.executable, "-m", "recursive_lm.benchmark", "train", "--config", f"configs/mor.py:{arg}",
                    "--steps", str(steps), "--out", f.name], check=True, capture_output=True)
    return json.load(open(f.name))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--out", default="")
  args = p.parse_args()
  runs = {name: [] for name in VARIANTS}
  for _ in range(args.rounds):
    for name, arg in VARIANTS.items():
      runs[name].append(bench(arg, args.steps))
      print(name, runs[name][-1]["step_s_median"], flush=True)
  best = {name: min(rs, key=lambda r: r["step_s_median"]) for name, rs in runs.items()}
  base = best["recursive"]
  out = {"config": "configs/mor.py (size small)", "steps": args.steps, "rounds": args.rounds, "variants": {}}
  for name, r in best.items():
    out["variants"][name] = {
        "step_s": r["step_s_median"], "step_s_all_rounds": [x["step_s_median"] for x in runs[name]],
        "tokens_per_s": r["tokens_per_s"], "flops_per_token": r["flops_per_token"],
        "flops_ratio": round(r["flops_per_token"] / base["flops_per_token"], 3),
        "step_time_ratio": round(r["step_s_median"] / base["step_s_median"], 3)}
  out["environment"] = {k: base[k] for k in ("backend", "device", "jax") if k in base}
  print(json.dumps(out, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
