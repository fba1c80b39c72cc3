"""Gemma 3 270M -> relaxed recursive models: eval loss at conversion, and after a short uptraining.

  pip install -e '.[gemma3]'
  python experiments/gemma3_convert/run.py grid --out experiments/gemma3_convert/grid.json
  python experiments/gemma3_convert/run.py uptrain --variant cycle,average,64 --steps 20 \
      --workdir /tmp/rrt --out experiments/gemma3_convert/uptrain_cycle_average_64.json

grid: every (plan, init, LoRA rank) below converted in memory from the GGUF
(per-depth norms on, so rank `full` is the source model) and evaluated on the
same validation batches of the embedded stdlib corpus, tokenized with the GGUF's
tokenizer. uptrain: the real pipeline — `python -m recursive_lm.convert`'s
functions write a run directory, `recursive_lm.train` continues it for --steps,
and the eval loss before and after is recorded; the directory's checkpoints
(about 3.3 GB each: float32 model + Adam moments) are deleted afterwards unless
--keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PLANS = ("cycle", "middle_cycle")
INITS = ("stepwise", "average", "lower")
RANKS = (0, 64, "full")
# Small enough for a 2-core CPU: a 262k vocabulary makes the head the biggest matmul.
DATA = {"data.seq_len": 128, "data.batch_size": 4, "data.max_bytes": 1_000_000, "train.eval_batches": 2,
        "mesh.data": 1}


def gguf_path() -> str:
  import reference
  return reference.gguf_path()


def eval_loss(model, batches) -> float:
  from recursive_lm.evaluate import evaluate
  return evaluate(model, batches)[0]


def grid(args) -> dict:
  from recursive_lm import config as config_lib
  from recursive_lm import data
  from recursive_lm.analysis import accounting
  from recursive_lm.convert import build, readers, workdir as wd

  path = gguf_path()
  t0 = time.time()
  src = readers.read(f"gguf:{path}")
  spec = f"gguf:{path}"
  base = config_lib.load(wd.make_config(src, tokenizer=spec, overrides=DATA))
  batches = data.eval_batches(base.data, base.train.eval_batches)
  print(f"read + tokenized in {time.time() - t0:.0f}s; eval {len(batches)} x {batches[0]['inputs'].shape}",
        file=sys.stderr)
  rows = []
  variants = [("vanilla", 1, "stepwise", 0)] + [(p, 2, i, r) for p in PLANS for i in INITS for r in RANKS]
  if args.only:
    variants = [v for v in variants if f"{v[0]},{v[2]},{v[3]}" in args.only.split(";")]
  for plan, repeats, init, rank in variants:
    t = time.time()
    cfg = config_lib.load(wd.make_config(src, plan, repeats, rank, 0.0, plan != "vanilla", spec, DATA))
    model, pure = build.converted_model(src, cfg.model, init)
    res = build.relative_residuals(src, cfg.model, pure) if plan != "vanilla" else {}
    loss = eval_loss(model, batches)
    counts = accounting.count_params(model)
    row = {"plan": plan, "repeats": repeats, "init": init, "lora_rank": rank, "eval_loss": loss,
           "params": counts["total_params"], "mean_relative_residual": (sum(res.values()) / len(res)) if res else 0.0,
           "seconds": round(time.time() - t, 1)}
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
    del model, pure
    if args.out:
      with open(args.out, "w") as f:
        json.dump({"gguf": os.path.basename(path), "data": DATA, "rows": rows}, f, indent=1)
  return {"rows": rows}


def uptrain(args) -> dict:
  from recursive_lm import checkpoint, data, train
  from recursive_lm import config as config_lib
  from recursive_lm.convert import readers, workdir as wd

  plan, init, rank = args.variant.split(",")
  rank = rank if rank == "full" else int(rank)
  path = gguf_path()
  src = readers.read(f"gguf:{path}")
  overrides = {**DATA, "train.steps": args.steps, "train.eval_every": args.steps, "train.log_every": 5,
               "train.checkpoint_every": args.steps, "train.keep_checkpoints": 1, "optim.lr": args.lr,
               "optim.warmup_steps": min(5, args.steps)}
  t = time.time()
  tok = wd.write_tokenizer(src, args.workdir, log=lambda s: print(s, file=sys.stderr))
  cd = wd.make_config(src, plan, 1 if plan == "vanilla" else 2, rank, 0.0, plan != "vanilla", tok, overrides)
  record = wd.write_run(src, cd, args.workdir, init, log=lambda s: print(s, file=sys.stderr))
  convert_s = time.time() - t
  cfg = checkpoint.load_config(args.workdir)
  _, model, _ = checkpoint.load_model(args.workdir)
  before = eval_loss(model, data.eval_batches(cfg.data, cfg.train.eval_batches))
  del model
  t = time.time()
  summary = train.run(cfg, args.workdir)
  out = {"variant": args.variant, "steps": args.steps, "lr": args.lr, "tokens_per_step": 4 * 128,
         "eval_loss_before": before, "eval_loss_after": summary["eval"]["eval_loss"],
         "train_seconds": round(time.time() - t, 1), "convert_seconds": round(convert_s, 1),
         "tokens_per_sec": summary["train"].get("tokens_per_sec"), "conversion": record}
  print(json.dumps(out), file=sys.stderr)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  if not args.keep:
    shutil.rmtree(os.path.join(args.workdir, "checkpoints"), ignore_errors=True)
  return out


def main() -> int:
  p = argparse.ArgumentParser()
  sub = p.add_subparsers(dest="cmd", required=True)
  g = sub.add_parser("grid")
  g.add_argument("--out", default=os.path.join(HERE, "grid.json"))
  g.add_argument("--only", default="", help="';'-separated plan,init,rank entries")
  u = sub.add_parser("uptrain")
  u.add_argument("--variant", required=True, help="plan,init,rank e.g. cycle,average,64")
  u.add_argument("--steps", type=int, default=20)
  u.add_argument("--lr", type=float, default=1e-4)
  u.add_argument("--workdir", required=True)
  u.add_argument("--out", default="")
  u.add_argument("--keep", action="store_true")
  args = p.parse_args()
  (grid if args.cmd == "grid" else uptrain)(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
