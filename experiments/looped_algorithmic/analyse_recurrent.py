"""Per-length exact-match accuracy of the recurrent runs under OUTDIR at test-time loop counts,
fixed (1, 2, 4, 8, 12) and growing with the input length (loops = n).

  python experiments/looped_algorithmic/analyse_recurrent.py runs/looped_algorithmic_recurrent [N_EXAMPLES]
Writes OUTDIR/results.jsonl and prints a markdown table (train mean / held-out mean per loop rule).
"""
import glob, json, os, sys

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recursive_lm.data.synthetic import parse_lengths
from recursive_lm.evaluate import accuracy_of_predictor
from recursive_lm.checkpoint import load_model as load_checkpoint

logging.set_verbosity(logging.WARNING)
out_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/looped_algorithmic_recurrent"
n_ex = int(sys.argv[2]) if len(sys.argv) > 2 else 512
rules = {"1": lambda n: 1, "2": lambda n: 2, "4 (mean trained)": lambda n: 4, "8": lambda n: 8,
         "12": lambda n: 12, "n (grows)": lambda n: n}
records = []
for wd in sorted(d for d in glob.glob(os.path.join(out_dir, "*_s*")) if os.path.isdir(d)):
  cfg, model, step = load_checkpoint(wd)
  tr, ev = parse_lengths(cfg.data.train_lengths), parse_lengths(cfg.data.eval_lengths)
  rec = {"run": os.path.basename(wd), "step": int(step), "loops": {}}
  graphdef, state = nnx.split(model)
  # One compiled predictor per run: the loop count is a traced argument (as evaluate's accuracy_by_length).
  fwd = jax.jit(lambda st, x, r: jnp.argmax(nnx.merge(graphdef, st)(x, loops=r)[0], axis=-1))
  for name, rule in rules.items():
    acc = {n: accuracy_of_predictor(lambda x, r=rule(n): np.asarray(fwd(state, jnp.asarray(x), jnp.int32(r))),
                                    cfg, [n], n_ex)[n] for n in tr + ev}
    rec["loops"][name] = {"acc": acc, "train_mean": sum(acc[n] for n in tr) / len(tr),
                          "heldout_mean": sum(acc[n] for n in ev) / len(ev)}
  records.append(rec)
  print(json.dumps({"run": rec["run"], **{k: [round(v["train_mean"], 3), round(v["heldout_mean"], 3)]
                                          for k, v in rec["loops"].items()}}), flush=True)
with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
  for r in records:
    f.write(json.dumps(r) + "\n")
print("| run | " + " | ".join(f"loops {k}" for k in rules) + " |")
print("|---|" + "---|" * len(rules))
for r in records:
  print(f"| {r['run']} | " + " | ".join(f"{v['train_mean']:.3f} / {v['heldout_mean']:.3f}"
                                        for v in r["loops"].values()) + " |")
