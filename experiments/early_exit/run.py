"""The early-exit experiment's measurements on trained run directories
(train them first with experiments/early_exit/train.sh).

  nice -n 10 python experiments/early_exit/run.py --runs /work/runs/early_exit --out results.json

For every run (default: exit_s* under --runs; plain_s* too when present):

  * loops: eval loss of the readout after each loop (final norm + head on the
    residual stream after loop j; the last is the model's output);
  * curve: for each exit rule (none, confidence:TAU, kl:EPS), the served
    eval loss (teacher-forced decoding through `exits.forward_with_exits`
    with the KV cache, token by token, so later tokens see the K/V an exited
    token wrote from its exit state: the real quality cost of serving with
    exits) and its mean exit loop; and greedy generation with the Engine on
    prompts cut from validation text: tokens/s, mean_exit_loop and the share
    of positions holding the full-depth (rule 'none') token;
  * speculation: greedy Engine(speculate=K, draft_loops=N) tokens/s and
    draft acceptance against plain decoding (outputs checked equal).

--depthwise also runs `python -m recursive_lm.benchmark generate --workdir RUN
--gen_exit RULE --gen_prompts text` per rule (exit_static vs exit_depthwise in one run)
and records its JSON.

Timing on a shared CPU is noisy: every tokens/s is one warm run (after an
untimed compile run); compare within a table, not across machines.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recursive_lm import data
from recursive_lm.inference import Engine, exits, load_checkpoint
from recursive_lm.train_step import token_losses

RULES = ["none", "confidence:0.8", "confidence:0.9", "confidence:0.95", "kl:0.01"]
SPECULATION = [(4, 1), (4, 2)]  # (K drafted tokens, draft loops)


def _loop_losses(state, graphdef, batch):
  """Summed token losses of the readout after each loop [loops], and the target count."""
  model = nnx.merge(graphdef, state)
  logits, _, aux = model(batch["inputs"], loop_states=True)
  outs = [model.readout(s) for s in aux["loop_states"]] + [logits]
  return jnp.stack([token_losses(l, batch["targets"])[0].sum() for l in outs]), (batch["targets"] >= 0).sum()


_loop_losses = jax.jit(_loop_losses, static_argnums=1)


def _served(graphdef, state, batch, threshold, kind: str):
  """Teacher-forced decoding with exits: (summed token losses, summed loops) over batch [B, T]."""
  model = nnx.merge(graphdef, state)
  inputs, targets = batch["inputs"], batch["targets"]
  b, t = inputs.shape
  rule = exits.ExitRule(kind, threshold)  # a traced threshold: one compile per kind

  def body(cache, i):
    tok = jax.lax.dynamic_slice_in_dim(inputs, i, 1, axis=1)
    logits, cache, loops = exits.forward_with_exits(model, tok, cache, jnp.full((b,), i, jnp.int32), rule)
    tgt = jax.lax.dynamic_slice_in_dim(targets, i, 1, axis=1)
    return cache, (token_losses(logits, tgt)[0].sum(), loops.sum())

  _, (losses, loops) = jax.lax.scan(body, model.init_cache(b, t), jnp.arange(t))
  return losses.sum(), loops.sum()


_served = jax.jit(_served, static_argnums=(0, 4))


def eval_batches(cfg, n: int):
  return [{k: jnp.asarray(v) for k, v in b.items()} for b in data.eval_batches(cfg.data, n)]


def per_loop_losses(model, batches) -> list[float]:
  graphdef, state = nnx.split(model)
  sums, count = 0.0, 0
  for batch in batches:
    s, c = _loop_losses(state, graphdef, batch)
    sums, count = sums + np.asarray(s), count + int(c)
  return [round(float(x) / count, 4) for x in sums]


def served_loss(model, batches, rule: str) -> tuple[float, float]:
  """(eval loss, mean loops per token) of serving with exit `rule` (not 'none')."""
  graphdef, state = nnx.split(model)
  parsed = exits.parse_exit(rule)
  total, looped, count = 0.0, 0.0, 0
  for batch in batches:
    s, l = _served(graphdef, state, batch, jnp.float32(parsed.threshold), parsed.kind)
    total, looped, count = total + float(s), looped + float(l), count + int((batch["targets"] >= 0).sum())
  return round(total / count, 4), round(looped / sum(b["inputs"].size for b in batches), 3)


def prompts_from(batches, n: int, length: int) -> list[np.ndarray]:
  rows = np.concatenate([np.asarray(b["inputs"]) for b in batches])
  return [rows[i % len(rows), :length] for i in range(n)]


def engine_run(model, tokenizer, prompts, new: int, slots: int, **engine_kw):
  """(completions, seconds, engine) of one warm greedy run (an untimed run first compiles)."""
  engine = Engine(model, tokenizer, slots=slots, max_len=max(p.size for p in prompts) + new, max_top_k=0,
                  stop_at_eos=False, **engine_kw)
  for timed in (False, True):
    t = time.perf_counter()
    outs = engine.generate(prompts, max_new_tokens=new)
    seconds = time.perf_counter() - t
    if not timed:
      engine.speculation = {"drafted": 0, "accepted": 0}
  return outs, seconds, engine


def depthwise_records(workdir: str, rules: list[str], args) -> list[dict] | str:
  """`benchmark generate --gen_exit RULE` per rule: with an exit rule it serves the same requests with exits
  waiting for the deepest row (exit_static) and with depth-wise batching (exit_depthwise), in one run."""
  out = []
  for rule in rules:
    if rule == "none":
      continue
    path = os.path.join(args.tmp, f"dw_{os.path.basename(workdir)}_{rule.replace(':', '_')}.json")
    res = subprocess.run([sys.executable, "-m", "recursive_lm.benchmark", "generate", "--workdir", workdir,
                          "--out", path, "--gen_exit", rule, "--gen_prompts=text", f"--gen_slots={args.dw_slots}",
                          f"--gen_requests={args.dw_requests}", f"--gen_max_prompt={args.prompt_len}",
                          f"--gen_max_new={args.new}", f"--gen_repeats={args.dw_repeats}"], capture_output=True, text=True)
    out.append(json.load(open(path)) if res.returncode == 0 else {"exit": rule, "error": res.stderr[-500:]})
  return out


def measure(workdir: str, args) -> dict:
  cfg, model, step = load_checkpoint(workdir)
  tokenizer = data.get_tokenizer(cfg.data.tokenizer)
  loops = len(exits.loop_boundaries(model.plan)) + 1
  batches = eval_batches(cfg, args.eval_batches)
  rec = {"workdir": workdir, "step": step, "loops": loops, "exit_loss_weights": list(cfg.train.exit_loss_weights),
         "loop_eval_loss": per_loop_losses(model, batches)}
  prompts = prompts_from(batches, args.requests, args.prompt_len)
  full, full_s, _ = engine_run(model, tokenizer, prompts, args.new, args.slots)
  requested = args.requests * args.new
  curve = []
  for rule in args.rules:
    if rule == "none":
      (loss, served_loops), outs, seconds = (rec["loop_eval_loss"][-1], float(loops)), full, full_s
    else:
      loss, served_loops = served_loss(model, batches, rule)
      outs, seconds, _ = engine_run(model, tokenizer, prompts, args.new, args.slots, exit=rule)
    same = sum(int(a == b) for x, y in zip(outs, full) for a, b in zip(x.tokens, y.tokens))
    gen_loops = [l for c in outs for l in (c.exit_loops or [])]
    curve.append({"exit": rule, "eval_loss": loss, "eval_mean_exit_loop": served_loops,
                  "tokens_per_s": round(requested / seconds, 1),
                  "mean_exit_loop": round(float(np.mean(gen_loops)), 3) if gen_loops else float(loops),
                  "greedy_agreement_with_full_depth": round(same / requested, 4)})
    print(json.dumps({"run": os.path.basename(workdir), **curve[-1]}), flush=True)
  rec["curve"] = curve
  spec = []
  for k, draft_loops in args.speculation:
    if draft_loops >= loops:
      continue
    outs, seconds, engine = engine_run(model, tokenizer, prompts, args.new, args.slots, speculate=k,
                                       draft_loops=draft_loops)
    s = engine.speculation
    spec.append({"speculate": k, "draft_loops": draft_loops, "tokens_per_s": round(requested / seconds, 1),
                 "plain_tokens_per_s": round(requested / full_s, 1), "speedup": round(full_s / seconds, 3),
                 "acceptance": round(s["accepted"] / s["drafted"], 4),
                 "equal_to_plain": all(a.tokens == b.tokens for a, b in zip(outs, full))})
    print(json.dumps({"run": os.path.basename(workdir), **spec[-1]}), flush=True)
  rec["speculation"] = spec
  if args.depthwise:
    rec["depthwise"] = depthwise_records(workdir, args.rules, args)
  return rec


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", default="/work/runs/early_exit", help="directory of the trained runs")
  p.add_argument("--names", default="", help="comma-separated run names under --runs (default: exit_s*, plain_s*)")
  p.add_argument("--out", required=True, help="JSON file to write")
  p.add_argument("--rules", default=",".join(RULES), help="comma-separated exit rules")
  p.add_argument("--speculation", default=",".join(f"{k}x{d}" for k, d in SPECULATION),
                 help="comma-separated KxN: K drafted tokens, N draft loops ('' for none)")
  p.add_argument("--eval_batches", type=int, default=2)
  p.add_argument("--requests", type=int, default=16)
  p.add_argument("--slots", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new", type=int, default=32)
  p.add_argument("--depthwise", action="store_true", help="also run `benchmark generate --gen_exit RULE` (depth-wise batching) per rule")
  p.add_argument("--dw_slots", type=int, default=32)
  p.add_argument("--dw_requests", type=int, default=64)
  p.add_argument("--dw_repeats", type=int, default=3, help="timed runs per serving mode (the fastest counts)")
  p.add_argument("--tmp", default="/tmp")
  args = p.parse_args()
  args.rules = [r for r in args.rules.split(",") if r]
  args.speculation = [tuple(int(x) for x in s.split("x")) for s in args.speculation.split(",") if s]
  names = [n for n in args.names.split(",") if n]
  dirs = [os.path.join(args.runs, n) for n in names] if names else sorted(
      d for pat in ("exit_s*", "plain_s*") for d in glob.glob(os.path.join(args.runs, pat)) if os.path.isdir(d))
  if not dirs:
    sys.exit(f"error: no run directories under {args.runs}")
  records = []
  for d in dirs:  # the file is rewritten after every run, so a long sweep keeps what it has measured
    records.append(measure(d, args))
    with open(args.out + ".tmp", "w") as f:
      json.dump({"runs": records, "settings": {k: v for k, v in vars(args).items()}}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
  main()
