"""Benchmarks, one subcommand (mode) each; every mode prints one JSON object
and writes it to --out when given.

  python -m recursive_lm.benchmark compile --config configs/recursive.py:size=tiny --repeats 4,16,64 --out c.json

Modes:
  compile  For each R in --repeats: set the config's plan to R repeats of its
           own K unique blocks (num_layers = K * R; K is read from the
           config's plan, so cycle, sequence, looped, middle_* and sandwich
           all work), build the model abstractly (`nnx.eval_shape`, nothing
           allocated) and time `jax.jit(loss_and_grad).lower(...)` and
           `.compile()` separately for a training forward + backward (value
           and grad of mean next-token cross-entropy) on a batch of the
           config's shape [data.batch_size, data.seq_len]. Since each stage
           runs as nested `lax.scan`s, both times should stay flat in R.
           Output: {"mode": "compile", "results": [{repeats, num_layers,
           lower_s, compile_s, lower_cpu_s, compile_cpu_s}],
           "ratio_<Rmax>_vs_<Rmin>": wall (lower + compile) at the largest R
           over the smallest, "compile_ratio_...", "cpu_ratio_...", ...}.

Adding a mode (e.g. `train` step time, `moe` dispatch): write
`def run_<mode>(cd: ml_collections.ConfigDict) -> dict` below, returning a
JSON-able dict with "mode" set; define any flags it reads next to the
existing ones (and say which mode reads them); register it in MODES. The
command line, config handling, error exit codes and --out are shared.

Timing is single-device and unsharded. Times depend on the machine and on
what else runs on it: compare numbers from one invocation, not across runs.
A config error prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import resource
import time
from typing import Callable

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from recursive_lm import cli
from recursive_lm import config as config_lib
from recursive_lm import plan as plan_lib
from recursive_lm.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, FILE[:ARG].", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
# compile mode:
_REPEATS = flags.DEFINE_list("repeats", ["4", "16", "64"], "compile: repeats (R) values to time.")
_STEPS = flags.DEFINE_integer("steps", 8, "train: timed steps after two warm-up steps.")
_LOOPS = flags.DEFINE_list("loops", [], "train, recurrent plans: core loop counts to time with the one compiled "
                           "step, in this order (default: the plan's repeats).")
_MOE_SIZE = flags.DEFINE_string("moe_size", "44m", "moe: layer size (44m | 126m | 244m | tiny); needs no --config.")
_MOE_BATCHES = flags.DEFINE_list("moe_batches", ["4", "16", "64"], "moe: batches of 1024-token sequences to "
                                 "measure, one call each (the configs/moeut.py presets train on 64).")
_MOE_DISPATCH = flags.DEFINE_string("moe_dispatch", "auto", "moe: model.moe.dispatch (auto | loop | blocks | ragged | "
                                    "megablox | ragged_mgpu | dense).")
_MOE_DTYPE = flags.DEFINE_enum("moe_dtype", "float32", ["float32", "bfloat16"], "moe: dtype of the layer's input "
                                "and matmuls (ragged_mgpu takes bfloat16 only).")
# generate mode:
_WORKDIR = flags.DEFINE_string("workdir", None, "generate: a run directory to load (instead of --config's "
                               "randomly initialised model).")
_GEN_REQUESTS = flags.DEFINE_integer("gen_requests", 32, "generate: requests to serve.")
_GEN_SLOTS = flags.DEFINE_integer("gen_slots", 8, "generate: batch rows (static batch size = engine slots).")
_GEN_MAX_PROMPT = flags.DEFINE_integer("gen_max_prompt", 48, "generate: prompt lengths are drawn from [4, this].")
_GEN_MAX_NEW = flags.DEFINE_integer("gen_max_new", 64, "generate: new tokens per request are drawn from "
                                    "[this / 8, this].")
_GEN_EXIT = flags.DEFINE_string("gen_exit", "none", "generate: also serve with this early-exit rule "
                                 "(confidence:TAU | kl:EPS; needs a looped model), waiting for the deepest row "
                                 "and by depth-wise batching, and evaluate the loss with it.")
_GEN_PROMPTS = flags.DEFINE_enum("gen_prompts", "random", ["random", "text"], "generate: prompts of random token ids, "
                                 "or prefixes of the model's validation text (data config).")
_GEN_EVAL_BATCHES = flags.DEFINE_integer("gen_eval_batches", 4, "generate with --gen_exit: validation batches of the "
                                         "model's data config for the eval loss with and without exits (0: skip).")
_GEN_REPEATS = flags.DEFINE_integer("gen_repeats", 1, "generate: timed runs of the workload per serving mode, "
                                    "after the untimed compile run; each mode reports its fastest (a busy "
                                    "moment slows one run, not the mode).")
_GEN_MATMUL = flags.DEFINE_enum("gen_matmul", "xla", ["xla", "native"], "generate: dense products of every "
                                "decode loop, XLA's or the packed CPU kernel (model/native.py; float32, CPU).")
_WARMUP = flags.DEFINE_bool("warmup", True, "compile: compile the first setting once, untimed, before timing "
                            "(so one-time JAX/XLA start-up is not charged to the first R).")



# ----------------------------------------------------------------------------
# compile mode


def with_repeats(cd: ml_collections.ConfigDict, repeats: int) -> ml_collections.ConfigDict:
  """A copy of cd whose plan runs each of its K shared blocks `repeats` times.

  K comes from cd's own plan; num_layers becomes K * repeats (plus the unique
  first and last layers for middle_* and sandwich).
  """
  cd = copy.deepcopy(cd)
  p = cd.model.plan
  try:
    p.num_layers, p.repeats = plan_lib.with_repeats(p.preset, p.num_layers, p.repeats, repeats, (p.prelude, p.coda))
  except ConfigError as e:
    raise ConfigError(f"benchmark compile: {e}") from None
  return cd


def train_loss_and_grad(cfg: config_lib.Config):
  """(jitted fn, abstract args): value_and_grad of mean cross-entropy w.r.t. params."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from recursive_lm.model.transformer import Transformer

  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  batch = {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32), "targets": jax.ShapeDtypeStruct(shape, jnp.int32)}

  def loss(params, rest, batch):
    logits, _, _ = nnx.merge(graphdef, params, rest)(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

  return jax.jit(jax.value_and_grad(loss)), (params, rest, batch)


def time_compile(cd: ml_collections.ConfigDict) -> dict:
  """Lower and compile the train forward + backward for one config; seconds."""
  cfg = config_lib.load(cd)
  fn, args = train_loss_and_grad(cfg)
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = fn.lower(*args)
  t1, c1 = time.perf_counter(), time.process_time()
  lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  # CPU seconds of this process too: on a shared machine they move less than wall time.
  return {"num_layers": cfg.model.plan.num_layers, "lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3),
          "lower_cpu_s": round(c1 - c0, 3), "compile_cpu_s": round(c2 - c1, 3)}


def run_compile(cd: ml_collections.ConfigDict) -> dict:
  try:
    repeats = [int(r) for r in _REPEATS.value]
  except ValueError:
    raise ConfigError(f"--repeats={','.join(_REPEATS.value)} must be a comma-separated list of ints") from None
  if not repeats or min(repeats) < 1:
    raise ConfigError(f"--repeats={','.join(_REPEATS.value)} must list positive ints")
  variants = [(r, with_repeats(cd, r)) for r in repeats]
  for _, v in variants:  # every setting must be valid before any timing starts
    config_lib.load(v)
  if _WARMUP.value:
    time_compile(variants[0][1])
  results = [{"repeats": r, **time_compile(v)} for r, v in variants]
  lo, hi = min(results, key=lambda x: x["repeats"]), max(results, key=lambda x: x["repeats"])
  total = lambda x: x["lower_s"] + x["compile_s"]
  cpu = lambda x: x["lower_cpu_s"] + x["compile_cpu_s"]
  return {
      "mode": "compile",
      "config": {"preset": cd.model.plan.preset, "d_model": cd.model.d_model,
                 "batch": [cd.data.batch_size, cd.data.seq_len], "remat": cd.model.remat, "scan": cd.model.scan},
      "results": results,
      f"ratio_{hi['repeats']}_vs_{lo['repeats']}": round(total(hi) / total(lo), 3),
      f"compile_ratio_{hi['repeats']}_vs_{lo['repeats']}": round(hi["compile_s"] / lo["compile_s"], 3),
      f"cpu_ratio_{hi['repeats']}_vs_{lo['repeats']}": round(cpu(hi) / cpu(lo), 3),
      **_environment(),
  }


# ----------------------------------------------------------------------------
# train mode


def run_train(cd: ml_collections.ConfigDict) -> dict:
  """Steady-state train step on synthetic tokens: step time, tokens/s, model
  FLOP/s, MFU against the peak measured in this run, compile time and XLA's
  memory estimate of the compiled step (arguments + temporaries).

  Recurrent plans: the step takes its loop count at run time (truncated
  backprop, model.recurrent.backprop_depth), so one compiled step is timed at
  every count of --loops in turn; "loops" then lists per count the step times
  (wall and this process's CPU seconds) and the process's peak resident
  memory after its steps (ru_maxrss, a high
  water mark: a count that needed more memory than the ones before raises
  it), with "step_ratio_<hi>_vs_<lo>" and "peak_rss_ratio_<hi>_vs_<lo>". The
  top-level step figures are those of the first count; FLOPs and MFU count
  the plan's repeats, differentiated throughout.
  """
  import jax
  import numpy as np
  from flax import nnx

  from recursive_lm import peak, sharding
  from recursive_lm.analysis.accounting import flops_per_token
  from recursive_lm.model import kernels
  from recursive_lm.state import make_state
  from recursive_lm.train_step import make_train_step

  cfg = config_lib.load(cd)
  mesh = sharding.make_mesh(cfg.mesh)
  preset = cfg.mesh.rules
  sharding.check_batch(cfg.data.batch_size, mesh, preset, cfg.optim.grad_accum)

  looped = plan_lib.from_config(cfg.model).recurrent
  try:
    counts = [int(r) for r in _LOOPS.value] or [cfg.model.plan.repeats]
  except ValueError:
    counts = [0]
  if min(counts) < 1 or (_LOOPS.value and not looped):
    raise ConfigError(f"--loops={','.join(_LOOPS.value)} must be loop counts >= 1 of a recurrent plan "
                      f"(model.plan.preset={cfg.model.plan.preset!r})")
  graphdef, state = nnx.split(sharding.create_sharded(lambda: make_state(cfg), mesh, preset))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = make_train_step(graphdef, shardings, sharding.batch_sharding(mesh, preset),
                         grad_accum=cfg.optim.grad_accum, recurrent=looped)
  # Recurrent plans: the step's loop count and initial-state key (`recurrent.draw`'s form), one per count.
  draws = [(np.int32(r), {"loops": np.int32(r), "key": np.zeros(2, np.uint32)}) for r in counts] if looped else []
  rng = np.random.default_rng(0)
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  batch = sharding.global_batch({k: rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32)
                                 for k in ("inputs", "targets")}, mesh, preset)
  t0 = time.perf_counter()
  extra = (draws[0][1],) if looped else ()
  with sharding.mesh_context(mesh, preset):
    lowered = step.lower(state, batch, *extra)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  on_cpu = jax.default_backend() == "cpu"
  # CPU peak: the best 2048^2 matmul rate before and after the timed steps
  # (the higher of the two, so a noisy moment cannot lower the peak and inflate MFU).
  peak_before = peak.measure_matmul_peak(repeats=10) if on_cpu else 0.0

  def timed(state, *extra):
    for _ in range(2):
      state, m = compiled(state, batch, *extra)
    jax.block_until_ready(m)
    times, cpu = [], []
    for _ in range(_STEPS.value):
      t, c = time.perf_counter(), time.process_time()
      state, m = compiled(state, batch, *extra)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
    return state, m, times, cpu  # cpu: this process's CPU seconds per step (on a shared machine, steadier)

  per_count = []
  for r, draw in draws:  # the same compiled step at every count
    state, m, times, cpu = timed(state, draw)
    per_count.append({"loops": int(r), "step_s_median": round(float(np.median(times)), 4),
                      "step_s_all": [round(t, 4) for t in times],
                      "step_cpu_s_median": round(float(np.median(cpu)), 4),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
  if not looped:
    state, m, times, _ = timed(state)
  else:
    times = per_count[0]["step_s_all"]
  step_s = float(np.median(times))
  tokens_per_s = shape[0] * shape[1] / step_s
  flops = flops_per_token(cfg, cfg.data.seq_len) * tokens_per_s
  if on_cpu:
    peak_flops = max(peak_before, peak.measure_matmul_peak(repeats=10))
    source = "float32 2048^2 matmul measured in this run (best of 10 before and 10 after the steps)"
  else:
    peak_flops, source = peak.total_peak(cfg.train.peak_flops)
  return {
      "mode": "train",
      "config": {"preset": cfg.model.plan.preset, "d_model": cfg.model.d_model, "effective_depth":
                 cfg.model.plan.num_layers, "batch": list(shape), "remat": cfg.model.remat,
                 "compute_dtype": cfg.model.compute_dtype, "mesh": dict(mesh.shape), "rules": preset,
                 "kernels": dataclasses.asdict(kernels.choose(cfg.model))},
      "step_s_median": round(step_s, 4), "step_s_all": [round(t, 4) for t in times],
      "tokens_per_s": round(tokens_per_s, 1), "model_flops_per_s": flops, "flops_per_token": flops / tokens_per_s,
      "peak_flops_per_s": peak_flops, "peak_source": source, "mfu": flops / peak_flops,
      "lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3),
      "memory_bytes": None if mem is None else {
          "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
          "temporaries": mem.temp_size_in_bytes, "total": mem.argument_size_in_bytes + mem.temp_size_in_bytes},
      "loss_last": float(m["loss"]),
      **(_loop_summary(per_count, cfg.model.recurrent.backprop_depth) if looped else {}),
      **_environment(),
  }


def _loop_summary(per_count: list[dict], backprop_depth: int) -> dict:
  lo, hi = min(per_count, key=lambda x: x["loops"]), max(per_count, key=lambda x: x["loops"])
  return {"backprop_depth": backprop_depth, "loops": per_count,
          f"step_ratio_{hi['loops']}_vs_{lo['loops']}": round(hi["step_s_median"] / lo["step_s_median"], 3),
          f"step_cpu_ratio_{hi['loops']}_vs_{lo['loops']}": round(hi["step_cpu_s_median"] / lo["step_cpu_s_median"], 3),
          f"peak_rss_ratio_{hi['loops']}_vs_{lo['loops']}": round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3)}


def run_moe(cd) -> dict:
  """sigma-MoE layer vs a dense MLP of equal active FLOPs (see model/moe_bench.py)."""
  from recursive_lm.model import moe_bench

  try:
    batches = [int(b) for b in _MOE_BATCHES.value]
  except ValueError:
    raise ConfigError(f"--moe_batches={','.join(_MOE_BATCHES.value)} must be comma-separated integers") from None
  return {"mode": "moe", **moe_bench.benchmark_moe(size=_MOE_SIZE.value, batches=batches, dispatch=_MOE_DISPATCH.value,
                                                   dtype=_MOE_DTYPE.value), **_environment()}


# ----------------------------------------------------------------------------
# generate mode


def generate_workload(n: int, max_prompt: int, max_new: int, vocab: int, seed: int = 0, text=None):
  """n requests of varied size: (prompt ids int32 [P_i] with P_i in [4, max_prompt], new tokens in
  [max_new // 8, max_new]). Prompts are random ids, or with text (int [rows, >= max_prompt]) the first
  P_i tokens of row i % rows."""
  import numpy as np
  rng = np.random.default_rng(seed)
  lengths = rng.integers(min(4, max_prompt), max_prompt + 1, n)
  news = rng.integers(max(1, max_new // 8), max_new + 1, n)
  if text is not None:
    return [(np.asarray(text[i % len(text), :p], np.int32), int(m)) for i, (p, m) in enumerate(zip(lengths, news))]
  return [(rng.integers(0, vocab, p).astype(np.int32), int(m)) for p, m in zip(lengths, news)]


def _text_rows(cfg, n: int, length: int):
  """n rows of the validation split's inputs (data config of the model), at least `length` tokens each."""
  import numpy as np
  from recursive_lm import data

  if cfg.data.seq_len < length:
    raise ConfigError(f"--gen_prompts=text: --gen_max_prompt {length} exceeds data.seq_len={cfg.data.seq_len}")
  rows = np.concatenate([np.asarray(b["inputs"]) for b in data.eval_batches(cfg.data, -(-n // cfg.data.batch_size))])
  return rows[:n]


def run_generate(cd) -> dict:
  """Greedy serving of requests of varied prompt length and new-token count:
  static batches of `generate` (rows padded to the longest prompt, every batch
  runs to the largest count; one compiled shape) against the engine's
  continuous batching with as many slots. tokens/s counts the tokens the
  requests asked for, over wall time; each side runs the workload once
  untimed (compilation), then --gen_repeats times timed (the fastest counts). A model with routers (model.mor)
  is also served by depth-wise batching (`_router_record`)."""
  import numpy as np
  from flax import nnx

  from recursive_lm.inference import Engine, depthwise, exits, generate, load_checkpoint
  from recursive_lm.model.transformer import Transformer

  if _WORKDIR.value:
    cfg, model, _ = load_checkpoint(_WORKDIR.value)
    source = _WORKDIR.value
  elif cd is not None:
    cfg = config_lib.load(cd)
    with nnx.use_eager_sharding(False):  # plain single-device arrays
      model, source = Transformer(cfg.model, nnx.Rngs(0)), "config (random init)"
  else:
    raise ConfigError("benchmark generate needs --workdir RUN or --config FILE[:ARG]")
  n, slots, max_prompt, max_new = _GEN_REQUESTS.value, _GEN_SLOTS.value, _GEN_MAX_PROMPT.value, _GEN_MAX_NEW.value
  for name, value in (("gen_requests", n), ("gen_slots", slots), ("gen_max_prompt", max_prompt),
                      ("gen_max_new", max_new)):
    if value < 1:
      raise ConfigError(f"--{name}={value} must be >= 1")
  if max_prompt + max_new > cfg.model.max_seq_len:
    raise ConfigError(f"--gen_max_prompt {max_prompt} + --gen_max_new {max_new} exceeds model.max_seq_len="
                      f"{cfg.model.max_seq_len}")
  try:
    rule = exits.parse_exit(_GEN_EXIT.value)
  except ValueError as e:
    raise ConfigError(f"--gen_{e}") from None
  try:
    loops = len(exits.loop_boundaries(model.plan, f"--gen_exit={_GEN_EXIT.value}")) + 1 if rule is not None else None
  except ValueError as e:
    raise ConfigError(str(e)) from None
  routed = model.routed is not None
  if rule is not None and routed:
    raise ConfigError(f"--gen_exit={_GEN_EXIT.value}: the model's routers (model.mor.routing="
                      f"{cfg.model.mor.routing!r}) decide each token's depth; leave --gen_exit at none")
  if rule is not None:
    try:
      depthwise.check_plan(model.plan)
    except ValueError as e:
      raise ConfigError(f"--gen_exit={_GEN_EXIT.value}: {e}") from None
  if _GEN_EVAL_BATCHES.value < 0:
    raise ConfigError(f"--gen_eval_batches={_GEN_EVAL_BATCHES.value} must be >= 0")
  matmul = _GEN_MATMUL.value
  cli.packed_for_decode(model, matmul)  # ConfigError when the model or machine cannot take it
  text = _text_rows(cfg, n, max_prompt) if _GEN_PROMPTS.value == "text" else None
  work = generate_workload(n, max_prompt, max_new, cfg.model.vocab_size, text=text)
  useful = sum(m for _, m in work)

  def static():
    outs = []
    for lo in range(0, n, slots):
      batch = work[lo:lo + slots]
      batch = batch + [batch[-1]] * (slots - len(batch))  # a full last batch: one compiled shape
      padded = np.zeros((slots, max_prompt), np.int32)
      for i, (p, _) in enumerate(batch):
        padded[i, :p.size] = p
      toks = np.asarray(generate(model, padded, max_new, prompt_lengths=[p.size for p, _ in batch], matmul=matmul))
      outs += [toks[i, p.size:p.size + m].tolist() for i, (p, m) in enumerate(batch)][:n - lo]
    return outs

  def continuous(exit_rule=None, depthwise=False):
    # The cache as long as the static side's (attention reads all of it at every step).
    engine = Engine(model, slots=slots, max_len=max_prompt + max_new, max_top_k=0, exit=exit_rule,
                    depthwise=depthwise, matmul=matmul)
    outs = []
    for _ in range(1 + repeats):  # compile, then timed
      for p, m in work:
        engine.submit(p, max_new_tokens=m)
      t = time.perf_counter()
      done = {c.id: c for c in engine.stream()}
      outs.append(([done[i] for i in sorted(done)], time.perf_counter() - t))
    return outs[-1][0], min(seconds for _, seconds in outs[1:])

  repeats = _GEN_REPEATS.value
  if repeats < 1:
    raise ConfigError(f"--gen_repeats={repeats} must be >= 1")
  static()  # compile
  s_time = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    s_out = static()
    s_time = min(s_time, time.perf_counter() - t)
  c_done, c_time = continuous()
  c_out = [c.tokens for c in c_done]
  agree = float(np.mean([a == b for a, b in zip(s_out, c_out)]))
  static_tps, cont_tps = useful / s_time, useful / c_time
  return {
      "mode": "generate", "model": source, "requests": n, "slots": slots, "max_prompt": max_prompt,
      "max_new": max_new, "prompts": _GEN_PROMPTS.value, "matmul": matmul, "requested_tokens": useful, "static_computed_tokens": -(-n // slots) * slots * max_new, "repeats": repeats,
      "static_s": round(s_time, 3), "continuous_s": round(c_time, 3),
      "static_tokens_per_s": round(static_tps, 1), "continuous_tokens_per_s": round(cont_tps, 1),
      "continuous_vs_static": round(cont_tps / static_tps, 3), "greedy_agreement": agree,
      **(_exit_record(continuous, _GEN_EXIT.value, loops, useful, c_out) if rule is not None else {}),
      **(_router_record(continuous, c_done, cont_tps, useful) if routed else {}),
      **(_exit_eval(model, cfg, rule, _GEN_EVAL_BATCHES.value) if rule is not None and _GEN_EVAL_BATCHES.value else {}),
      "config": {"preset": cfg.model.plan.preset, "d_model": cfg.model.d_model,
                 "effective_depth": cfg.model.plan.num_layers},
      **_environment(),
  }


def _exit_record(continuous, spec: str, loops: int, useful: int, full: list) -> dict:
  """The engine with per-token exits, waiting for the deepest row (exit_static) and by depth-wise batching,
  against the full-depth engine run `full` (greedy tokens per request)."""
  import numpy as np

  done, seconds = continuous(spec)
  toks = [c.tokens for c in done]
  same = sum(int(a == b) for x, y in zip(toks, full) for a, b in zip(x, y))
  d_done, d_seconds = continuous(spec, depthwise=True)
  d_same = sum(int(a == b) for x, y in zip([c.tokens for c in d_done], toks) for a, b in zip(x, y))
  static_tps, depthwise_tps = useful / seconds, useful / d_seconds
  return {"exit": spec, "loops": loops, "exit_static_tokens_per_s": round(static_tps, 1),
          "exit_depthwise_tokens_per_s": round(depthwise_tps, 1),
          "depthwise_vs_static": round(depthwise_tps / static_tps, 3),
          "mean_exit_loop": round(float(np.mean(np.concatenate([c.exit_loops for c in done if c.exit_loops]))), 3),
          # Fraction of the requested positions holding the full-depth token (once a token differs, the
          # continuation after it usually does too).
          "greedy_agreement_with_full_depth": round(same / useful, 4),
          # The two exit engines decode the same tokens (up to float reassociation flipping a near tie).
          "depthwise_agreement_with_exit_static": round(d_same / useful, 4),
          "note": "exit_static: a step runs every loop's layers while any slot still runs (then K/V projections "
                  "only); exit_depthwise: a step is one loop for every slot, each at its own loop index"}


def _router_record(continuous, done: list, all_tps: float, useful: int) -> dict:
  """A model with routers (model.mor): the plain engine run `done` (every recursion step's layers run for
  every token, an unchosen token's result dropped) against depth-wise batching, where a token the router
  stops leaves its slot."""
  import numpy as np

  d_done, d_seconds = continuous(depthwise=True)
  same = sum(int(a == b) for x, y in zip([c.tokens for c in d_done], [c.tokens for c in done]) for a, b in zip(x, y))
  depthwise_tps = useful / d_seconds
  return {"router_all_recursions_tokens_per_s": round(all_tps, 1),
          "router_depthwise_tokens_per_s": round(depthwise_tps, 1),
          "router_depthwise_vs_all_recursions": round(depthwise_tps / all_tps, 3),
          "mean_recursions": round(float(np.mean(np.concatenate([c.exit_loops for c in done if c.exit_loops]))), 3),
          # The two engines decode the same tokens (up to float reassociation flipping a near tie).
          "router_depthwise_agreement": round(same / useful, 4)}


def _exit_eval(model, cfg, rule, n: int) -> dict:
  """Mean token cross-entropy over n validation batches of the model's data config, at full depth and with
  every token exiting by `rule` (`exits.teacher_forced`), and the mean exit loop there."""
  import jax
  import numpy as np
  from flax import nnx

  from recursive_lm import data
  from recursive_lm.evaluate import evaluate
  from recursive_lm.inference import exits
  from recursive_lm.train_step import token_losses

  batches = data.eval_batches(cfg.data, n)
  full, count = evaluate(model, batches)
  if model.recurrent or model.plan.kv_sharing != "none":
    return {"eval_loss": round(full, 4), "eval_loss_with_exits": None,
            "eval_note": "no loss with exits: exits.teacher_forced needs a non-recurrent plan without KV sharing"}
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, inputs, targets):
    logits, loops = exits.teacher_forced(nnx.merge(graphdef, state), inputs, rule)
    losses, valid = token_losses(logits, targets)
    return losses.sum(), (loops * valid).sum(), valid.sum()

  total = used = 0.0
  for b in batches:
    s, l, _ = step(state, np.asarray(b["inputs"]), np.asarray(b["targets"]))
    total, used = total + float(s), used + float(l)
  return {"eval_loss": round(full, 4), "eval_loss_with_exits": round(total / count, 4),
          "eval_mean_exit_loop": round(used / count, 3), "eval_tokens": count}


def _environment() -> dict:
  import jax

  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": dev.device_kind, "jax": jax.__version__,
          "python": platform.python_version()}


# ----------------------------------------------------------------------------
# Extension point: mode name -> function(config dict) -> JSON-able dict.

MODES: dict[str, Callable[[ml_collections.ConfigDict], dict]] = {
    "compile": run_compile,
    "train": run_train,
    "moe": run_moe,
    "generate": run_generate,
}
NEEDS_CONFIG = ("compile", "train")


# ----------------------------------------------------------------------------
# Command line.


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in MODES:
    raise app.UsageError(f"usage: python -m recursive_lm.benchmark {{{'|'.join(MODES)}}} --config FILE[:ARG] "
                         f"[--out FILE.json] (got {argv[1:]})")
  if _CONFIG.value is None and argv[1] in NEEDS_CONFIG:
    cli.fail("--config FILE[:ARG] is required")
  cli.route_library_logs(None, "benchmark")
  try:
    result = MODES[argv[1]](_CONFIG.value)
  except (ConfigError, OSError) as e:  # OSError: a missing config file surfaces on first access
    cli.fail(e)
  text = json.dumps(result, indent=2)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
