"""Gemma 3 270M retrofitted to prelude / core / coda, against the RRT cycle conversion, same uptraining budget.

  pip install -e '.[gemma3]'
  nice -n 10 python experiments/recurrent_retrofit/run.py retrofit,cycle --steps 10 --workdir /tmp/g3 \
      --out experiments/recurrent_retrofit/results.json

retrofit: source layers 0-3 prelude, 4-7 core, 14-17 coda, 8-13 dropped
(`convert --plan recurrent --prelude 4 --core 4 --coda 4 --drop 8-13`; the
drop keeps every layer's local / global kind), concat injection initialised
to pass the state through, trained with the convert's retrofit recipe (loop
counts Poisson log-normal, mean rising 1 -> --mean by the 1-sqrt curriculum
over the run, last --backprop_depth iterations differentiated). cycle: the RRT
conversion of experiments/gemma3_convert (9 blocks x 2, average init, SVD LoRA
64, per-depth norms). Both: the same data, steps, batch, optimiser as
experiments/gemma3_convert's uptraining. Eval loss on the same validation
batches before and after, the retrofit at every --loops count (`evaluate
--loops`); the directory's checkpoints are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "gemma3_convert"))

DATA = {"data.seq_len": 128, "data.batch_size": 4, "data.max_bytes": 1_000_000, "train.eval_batches": 2,
        "mesh.data": 1}


def overrides(args) -> dict:
  return {**DATA, "train.steps": args.steps, "train.eval_every": args.steps, "train.log_every": 1,
          "train.checkpoint_every": args.steps, "train.keep_checkpoints": 1, "optim.lr": args.lr,
          "optim.warmup_steps": min(5, args.steps)}


def run(args, variant: str, src, workdir: str) -> dict:
  from recursive_lm import checkpoint, evaluate, train
  from recursive_lm import config as config_lib
  from recursive_lm.convert import retrofit, workdir as wd

  log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
  ov = overrides(args)
  t = time.time()
  tok = wd.write_tokenizer(src, workdir, log=log)
  layer_map = None
  if variant == "retrofit":
    split = (4, 4, 4)
    ov.update({"model.recurrent.mean": args.mean, "model.recurrent.backprop_depth": args.backprop_depth,
               "model.recurrent.curriculum": args.curriculum})
    cd = wd.make_config(src, "recurrent", 1, 0, 0.0, False, tok, ov, split)
    layer_map = retrofit.checked_map(src, ["8-13"], config_lib.load(cd).model)
    init = "stepwise"  # unused with a layer map
  else:
    cd = wd.make_config(src, "cycle", 2, 64, 0.0, True, tok, ov)
    init = "average"
  record = wd.write_run(src, cd, workdir, init, log=log, layer_map=layer_map)
  if args.variants.split(",")[-1] == variant:
    src.layers.clear()  # the last conversion: training needs the memory (the source holds ~1 GB)
  convert_s = time.time() - t
  loops = [int(x) for x in args.loops.split(",")] if variant == "retrofit" else None

  def measure():
    if loops:
      return {r["loops"]: r["eval_loss"] for r in evaluate.run_loops(workdir, loops)}
    return {"plan": evaluate.run(workdir)["eval_loss"]}

  t = time.time()
  before = measure()
  log(f"before: {before} ({time.time() - t:.0f}s)")
  cfg = checkpoint.load_config(workdir)
  t = time.time()
  summary = train.run(cfg, workdir)
  train_s = time.time() - t
  after = measure()
  log(f"after: {after}")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  train_loops = []
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      train_loops = [r["loops"] for r in map(json.loads, f) if "loops" in r]
  out = {"variant": variant, "steps": args.steps, "lr": args.lr, "tokens_per_step": 4 * 128,
         "eval_loss_before": before, "eval_loss_after": after, "train_loops": train_loops,
         "train_seconds": round(train_s, 1), "convert_seconds": round(convert_s, 1),
         "tokens_per_sec": summary["train"].get("tokens_per_sec"), "final_train": summary["train"],
         "conversion": record}
  print(json.dumps(out), file=sys.stderr, flush=True)
  if not args.keep:
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  return out


def parity(args, src) -> dict:
  """The retrofit with nothing dropped (6 / 6 / 6), converted in memory: at one loop it is the source."""
  from recursive_lm import config as config_lib
  from recursive_lm import data
  from recursive_lm.convert import build, retrofit, workdir as wd
  from recursive_lm.evaluate import evaluate
  from recursive_lm.train_step import make_eval_step
  from flax import nnx

  spec = src.origin  # gguf:PATH: its tokenizer
  cfg = config_lib.load(wd.make_config(src, "recurrent", 1, tokenizer=spec, overrides=DATA, split=(6, 6, 6)))
  model, _ = build.converted_model(src, cfg.model, layer_map=retrofit.checked_map(src, [], cfg.model))
  batches = data.eval_batches(cfg.data, cfg.train.eval_batches)
  step = make_eval_step(nnx.graphdef(model), loops=True)
  out = {"split": [6, 6, 6], "eval_loss": {r: evaluate(model, batches, step, r)[0] for r in (1, 2)}}
  print(json.dumps(out), file=sys.stderr, flush=True)
  return out


def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("variants", help="comma-separated: retrofit, cycle, parity (in this order, one GGUF read)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--mean", type=float, default=4.0, help="retrofit: target mean loop count of the curriculum")
  p.add_argument("--backprop_depth", type=int, default=4)
  p.add_argument("--curriculum", default="1-sqrt")
  p.add_argument("--loops", default="1,2,4,8", help="retrofit: test-time loop counts evaluated")
  p.add_argument("--workdir", required=True, help="parent of one run directory per variant")
  p.add_argument("--out", default="")
  p.add_argument("--keep", action="store_true")
  args = p.parse_args()
  import reference
  from recursive_lm.convert import readers
  t = time.time()
  src = readers.read(f"gguf:{reference.gguf_path()}")
  print(f"read the GGUF in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
  results = {}
  for variant in args.variants.split(","):
    if variant not in ("retrofit", "cycle", "parity"):
      raise SystemExit(f"error: variant {variant!r} is not retrofit, cycle or parity")
    results[variant] = parity(args, src) if variant == "parity" else \
        run(args, variant, src, os.path.join(args.workdir, variant))
    if args.out:  # after every variant: a later one that fails keeps the earlier results
      with open(args.out, "w") as f:
        json.dump({"data": DATA, "results": results}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
