"""Recurrent depth (preset 'recurrent'): the plan, the core against a hand-unrolled
prelude / core x r / coda (values and gradients, every injection kind), truncated
backprop against stop_gradient placed by hand, one compiled program for every
loop count, and the config errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm import plan as plan_lib
from recursive_lm.analysis import accounting
from recursive_lm.config import ConfigError
from recursive_lm.model.recurrent import draw, initial_state
from recursive_lm.model.recursion import apply_layer
from test_model import assert_trees_close, build_random, cross_entropy, tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INJECTIONS = ("concat", "add", "parcae")


def recurrent(injection="concat", init_state="normal", repeats=3, backprop_depth=8, **extra):
  """prelude 1, core 2 unique blocks x repeats, coda 1 (num_layers = 2 + 2 * repeats)."""
  return dict(preset="recurrent", num_layers=2 + 2 * repeats, repeats=repeats,
              **{"model.plan.prelude": 1, "model.plan.coda": 1, "model.recurrent.injection": injection,
                 "model.recurrent.init_state": init_state, "model.recurrent.backprop_depth": backprop_depth},
              **extra)


def test_plan_layout_and_errors():
  plan = plan_lib.build("recurrent", 2 + 4 * 3 + 2, 3)
  assert [(s.name, s.unique_blocks, s.repeats) for s in plan.stages] == [("prelude", 2, 1), ("core", 4, 3),
                                                                         ("coda", 2, 1)]
  core = [(l.block, l.repeat) for l in plan.stage_layers(1)]
  assert core == [(b, r) for r in range(3) for b in range(4)]  # cycle order: one iteration = the U blocks
  assert plan_lib.with_repeats("recurrent", 8, 3, 5, ends=(1, 1)) == (12, 5)
  with pytest.raises(ConfigError, match="prelude=0"):
    plan_lib.build("recurrent", 6, 2, ends=(0, 1))
  with pytest.raises(ConfigError, match="num_layers - prelude - coda=5 is not divisible by model.plan.repeats=2"):
    plan_lib.build("recurrent", 7, 2, ends=(1, 1))
  with pytest.raises(ConfigError, match="num_layers >= prelude \\+ repeats \\+ coda = 8"):
    config_lib.load(tiny_config(preset="recurrent", num_layers=6, repeats=4))


@pytest.mark.parametrize("key,value,match", [
    ("model.recurrent.injection", "mul", "model.recurrent.injection='mul' is not one of"),
    ("model.recurrent.init_state", "ones", "model.recurrent.init_state='ones'"),
    ("model.recurrent.sample", "gauss", "model.recurrent.sample='gauss'"),
    ("model.recurrent.backprop_depth", 0, "model.recurrent.backprop_depth=0 must be > 0"),
    ("model.recurrent.sigma", 0.0, "model.recurrent.sigma=0.0 must be > 0"),
    ("model.recurrent.max_loops", 0, "model.recurrent.max_loops=0 must be >= model.recurrent.min_loops=1"),
    ("model.kv_sharing", "recursion", "preset='recurrent' needs model.block='dense' and model.kv_sharing='none'"),
])
def test_bad_recurrent_values_are_one_line_errors(key, value, match):
  with pytest.raises(ConfigError, match=match) as e:
    config_lib.load(tiny_config(**{**recurrent(), key: value}))
  assert "\n" not in str(e.value)


def hand_forward(model, toks, loops, key=None, stop_after=None):
  """prelude -> (inject, U core blocks) x loops -> coda -> readout, one
  effective layer at a time through `apply_layer`. stop_after: the state is
  stop_gradient-ed after that many iterations (truncated backprop by hand).
  Iteration i beyond the plan's repeats C uses repeat C - 1's layer records."""
  cfg, plan = model.cfg, model.plan
  ctx, _ = model.context(toks.shape[1])
  x = model.embed(toks, jnp.float32)
  for layer in plan.stage_layers(0):
    x = apply_layer(model.stages[0], layer, x, ctx)[0]
  e, core = x, plan.stage_layers(1)
  s = initial_state(cfg.recurrent.init_state, e, key, ctx.positions)
  u, c = plan.stages[1].unique_blocks, plan.stages[1].repeats
  for i in range(loops):
    if i == stop_after:
      s = jax.lax.stop_gradient(s)
    s = model.injection(s, e)
    for layer in core[min(i, c - 1) * u:(min(i, c - 1) + 1) * u]:
      s = apply_layer(model.stages[1], layer, s, ctx)[0]
  if loops == stop_after:
    s = jax.lax.stop_gradient(s)
  x = s
  for layer in plan.stage_layers(2):
    x = apply_layer(model.stages[2], layer, x, ctx)[0]
  return model.readout(x)


def value_and_grad(model, run):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  targets = tokens(1)

  def loss(p):
    logits = run(nnx.merge(graphdef, p, rest))
    return cross_entropy(logits, targets) + 1e-3 * jnp.mean(logits**2), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


@pytest.mark.parametrize("injection", INJECTIONS)
def test_core_at_fixed_loops_equals_hand_unrolled(injection):
  """The scanned stage (loops=None), the unrolled path and the runtime-count
  path (loops=r with k >= r) all equal the hand-written unrolled model, in
  logits and in the gradient of every parameter (per-depth LoRA included)."""
  model = build_random(**recurrent(injection, lora_rank=2, per_depth_norms=True))
  toks = tokens(0)
  ref_logits, ref_grads = value_and_grad(model, lambda m: hand_forward(m, toks, 3))
  for run in (lambda m: m(toks)[0], lambda m: m(toks, unrolled=True)[0], lambda m: m(toks, loops=3)[0]):
    logits, grads = value_and_grad(model, run)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert_trees_close(grads, ref_grads)
  for path, g in jax.tree_util.tree_leaves_with_path(ref_grads):
    assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("injection,init_state,loops", [
    ("concat", "normal", 5),  # 3 iterations without gradient, 2 with
    ("parcae", "prelude", 4),  # a state that depends on e: the cut must block it too
    ("add", "prelude", 1),  # loops < k: every iteration differentiated, the initial state included
    ("add", "prelude", 2),  # loops == k
])
def test_truncated_backprop_equals_stop_gradient_by_hand(injection, init_state, loops):
  model = build_random(**recurrent(injection, init_state, repeats=3, backprop_depth=2, lora_rank=2))
  toks, key = tokens(0), jax.random.key(7)
  cut = loops - 2 if loops > 2 else None  # k = 2: no cut at all when loops <= k
  ref_logits, ref_grads = value_and_grad(model, lambda m: hand_forward(m, toks, loops, key, stop_after=cut))
  logits, grads = value_and_grad(model, lambda m: m(toks, loops=loops, key=key)[0])
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  assert_trees_close(grads, ref_grads)
  if loops > 2:  # the cut is real: the full gradient differs
    _, full = value_and_grad(model, lambda m: hand_forward(m, toks, loops, key))
    assert not np.allclose(full["embed"]["table"][...], ref_grads["embed"]["table"][...], atol=1e-6)


def test_loop_counts_beyond_training_and_parcae_contracts():
  """More loops than the plan's repeats run (the last repeat's slots serve the
  rest) and equal the hand-unrolled model; parcae's decay is in (0, 1)."""
  model = build_random(**recurrent("parcae", repeats=2, lora_rank=2))
  toks = tokens(0)
  np.testing.assert_allclose(model(toks, loops=6)[0], hand_forward(model, toks, 6), rtol=1e-5, atol=1e-5)
  a = np.asarray(model.injection.decay())
  assert a.shape == (42,) and (a > 0).all() and (a < 1).all()


def test_changing_the_loop_count_does_not_recompile():
  model = build_random(**recurrent("concat", backprop_depth=2))
  graphdef, state = nnx.split(model)
  toks = tokens(0)

  @jax.jit
  def loss_and_grad(state, loops):
    def loss(p):
      return cross_entropy(nnx.merge(graphdef, p)(toks, loops=loops)[0], tokens(1))
    return jax.value_and_grad(loss)(state)

  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    losses = [float(loss_and_grad(state, jnp.int32(r))[0]) for r in (1, 2, 5, 9)]
    first = len(compiles)
    losses += [float(loss_and_grad(state, jnp.int32(r))[0]) for r in (3, 17)]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert loss_and_grad._cache_size() == 1
  assert len(compiles) == first  # no backend compile after the first counts
  assert len(set(losses)) == len(losses)  # the count is really used


def test_kv_cache_decoding_matches_full_forward():
  """The plan's loop count with a KV cache per core depth: prefill then one
  token at a time equals the full forward (the random initial state is a
  function of the position)."""
  model = build_random(**recurrent("concat", repeats=2, lora_rank=2))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  toks = tokens(8)
  full = model(toks)[0]

  @jax.jit
  def run(p, chunk, cache, index):
    logits, cache, _ = nnx.merge(graphdef, p, rest)(chunk, cache=cache, cache_index=index)
    return logits, cache

  cache = model.init_cache(toks.shape[0], toks.shape[1])
  logits, cache = run(params, toks[:, :3], cache, jnp.int32(0))
  outs = [logits]
  for i in range(3, toks.shape[1]):
    logits, cache = run(params, toks[:, i:i + 1], cache, jnp.int32(i))
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_probes_walk_the_core_as_the_model_runs_it():
  from recursive_lm.analysis import probes
  model = build_random(**recurrent("parcae", repeats=2))
  hidden, _ = probes.residual_stream(model, tokens(0))
  assert hidden.shape[0] == model.plan.depth + 1
  np.testing.assert_allclose(model.readout(hidden[-1]), model(tokens(0))[0], rtol=1e-5, atol=1e-5)


def test_loops_on_a_plan_without_a_core_is_an_error():
  model = build_random(preset="cycle", num_layers=4, repeats=2)
  with pytest.raises(ValueError, match="only a recurrent plan takes a loop count"):
    model(tokens(0), loops=2)


def test_describe_cli_shows_prelude_core_coda():
  out = subprocess.run([sys.executable, "-m", "recursive_lm.describe", "--config", "configs/default.py",
                        "--config.model.plan.preset=recurrent", "--config.model.plan.num_layers=8",
                        "--config.model.plan.repeats=2", "--config.model.plan.prelude=2",
                        "--config.model.plan.coda=2"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  d = json.loads(out.stdout)
  assert [(p["stage"], p["block"], p["repeat"]) for p in d["plan"]] == (
      [("prelude", 0, 0), ("prelude", 1, 0)] + [("core", b, r) for r in range(2) for b in range(2)]
      + [("coda", 0, 0), ("coda", 1, 0)])



def test_injection_parameters_are_counted():
  """concat stores W [2D, D] and runs it once per iteration; parcae stores
  B [D, D] and two rates [D]; add stores nothing."""
  def counts(injection):
    cfg = config_lib.load(tiny_config(**recurrent(injection)))
    return (accounting.count_params(accounting.abstract_model(cfg))["unique_params"],
            accounting.matmul_params_per_token(cfg))
  (add, add_flops), (concat, concat_flops), (parcae, parcae_flops) = counts("add"), counts("concat"), counts("parcae")
  d = 42
  assert concat - add == 2 * d * d and parcae - add == d * d + 2 * d
  assert concat_flops - add_flops == 3 * 2 * d * d and parcae_flops - add_flops == 3 * d * d


def test_loop_count_draw_is_a_function_of_seed_and_step():
  rc = config_lib.load(tiny_config(**{**recurrent(), "model.recurrent.sample": "poisson_lognormal",
                                      "model.recurrent.mean": 4.0, "model.recurrent.max_loops": 64})).model.recurrent
  draws = [draw(rc, 3, seed=5, step=s) for s in range(1, 2001)]
  again = [draw(rc, 3, seed=5, step=s) for s in (1500, 7, 2000)]
  for got, step in zip(again, (1500, 7, 2000)):
    assert got["loops"] == draws[step - 1]["loops"] and (got["key"] == draws[step - 1]["key"]).all()
  loops = np.array([d["loops"] for d in draws])
  # Huginn's Poisson of a log-normal rate with mean r-bar = 4, plus one: mean 5, all >= 1, a heavy tail.
  assert abs(loops.mean() - 5.0) < 0.25 and loops.min() >= 1 and loops.max() > 10
  assert [d["loops"] for d in (draw(rc, 3, 6, s) for s in range(1, 50))] != list(loops[:49])  # the seed matters
  uniform = config_lib.load(tiny_config(**{**recurrent(), "model.recurrent.sample": "uniform",
                                           "model.recurrent.min_loops": 2, "model.recurrent.max_loops": 5}))
  got = {int(draw(uniform.model.recurrent, 3, 0, s)["loops"]) for s in range(200)}
  assert got == {2, 3, 4, 5}
  fixed = config_lib.load(tiny_config(**recurrent(repeats=3))).model.recurrent
  assert {int(draw(fixed, 3, 0, s)["loops"]) for s in range(20)} == {3}


def _recurrent_run(workdir, stop_at=None):
  import tiny_run
  from recursive_lm import train
  cfg = config_lib.load(tiny_run.config("batch=8,steps=6,checkpoint_every=2,eval_every=6", **{
      "model.plan.preset": "recurrent", "model.plan.num_layers": 6, "model.plan.repeats": 2,
      "model.plan.prelude": 1, "model.plan.coda": 1, "model.recurrent.sample": "uniform",
      "model.recurrent.min_loops": 1, "model.recurrent.max_loops": 6, "model.recurrent.backprop_depth": 2}))
  train.run(cfg, workdir, stop_at=stop_at)
  return cfg


@pytest.mark.slow
def test_training_logs_the_drawn_loop_counts_resumes_bit_exactly_and_evaluates_any_loop_count(tmp_path):
  from recursive_lm import metrics
  cfg = _recurrent_run(str(tmp_path / "a"))
  _recurrent_run(str(tmp_path / "b"), stop_at=3)
  _recurrent_run(str(tmp_path / "b"))
  a, b = (metrics.read(str(tmp_path / w)) for w in ("a", "b"))
  loops = [r["loops"] for r in a if "loss" in r]
  assert loops == [float(draw(cfg.model.recurrent, 2, cfg.seed, s)["loops"]) for s in range(1, 7)]
  assert len(set(loops)) > 1
  strip = lambda recs: [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")} for r in recs]
  assert strip(a) == strip(b)

  # evaluate --loops: one record per count; at the plan's repeats (2) it is the run's own eval.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  evaluate = lambda *args: subprocess.run([sys.executable, "-m", "recursive_lm.evaluate", "--workdir",
                                           str(tmp_path / "a"), *args], cwd=REPO, capture_output=True, text=True,
                                          timeout=300, env=env)
  out = evaluate("--loops", "1,2,5")
  assert out.returncode == 0, out.stderr
  records = [json.loads(l) for l in out.stdout.splitlines()]
  assert [r["loops"] for r in records] == [1, 2, 5]
  (run_eval,) = [r for r in a if r.get("step") == 6 and "eval_loss" in r]
  assert records[1]["eval_loss"] == pytest.approx(run_eval["eval_loss"], rel=1e-6)
  assert len({r["eval_loss"] for r in records}) == 3
  bad = evaluate("--loops", "2,-1")
  assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.strip() == (
      "error: --loops='2,-1' must be comma-separated integers >= 1 (e.g. 1,2,4,8)")


def test_config_file_variants():
  import importlib.util
  spec = importlib.util.spec_from_file_location("recurrent_config", os.path.join(REPO, "configs", "recurrent.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = config_lib.load(module.get_config("size=tiny,injection=parcae,mean_loops=3,backprop_depth=1,core=2,"
                                          "per_sequence=true"))
  p, rc = cfg.model.plan, cfg.model.recurrent
  assert rc.per_sequence
  assert (p.preset, p.prelude, p.repeats, p.coda, p.num_layers) == ("recurrent", 1, 3, 1, 1 + 2 * 3 + 1)
  assert (rc.injection, rc.mean, rc.backprop_depth, rc.max_loops, rc.sample) == ("parcae", 3.0, 1, 12,
                                                                                 "poisson_lognormal")
  with pytest.raises(ConfigError, match="model.recurrent.injection='mul'"):
    config_lib.load(module.get_config("size=tiny,injection=mul"))


def test_truncated_backprop_memory_does_not_grow_with_loops():
  """Compiled temp memory of the gradient: the runtime-count path (k = 2, one
  program for every count) needs about what the fully differentiated scan
  needs at r = 2 (measured 1.2x here: the cond that skips steps before the
  first counted one keeps a little more; 1.07x at d_model 64, T 64), while
  the scan at r = 16 needs several times more."""
  def temp_bytes(repeats, runtime):
    cfg = config_lib.load(tiny_config(**recurrent("concat", repeats=repeats, backprop_depth=2)))
    graphdef, params, rest = nnx.split(accounting.abstract_model(cfg), nnx.Param, ...)

    def loss(p, toks, loops):
      logits = nnx.merge(graphdef, p, rest)(toks, **({"loops": loops} if runtime else {}))[0]
      return cross_entropy(logits, toks)

    args = (params, jax.ShapeDtypeStruct((2, 32), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    return jax.jit(jax.grad(loss)).lower(*args).compile().memory_analysis().temp_size_in_bytes

  scan2, scan16, runtime = temp_bytes(2, False), temp_bytes(16, False), temp_bytes(2, True)
  assert runtime <= 1.3 * scan2 and scan16 > 3 * scan2, (scan2, scan16, runtime)


@pytest.mark.parametrize("extra", [dict(lora_rank=2, per_depth_norms=True), dict()])
def test_per_sequence_loop_counts_equal_each_row_run_alone(extra):
  """One count per row ([B]): every row's logits and its share of the gradient
  equal that row run alone at its own count, truncated backprop included (k =
  2; counts below, at and above k and beyond the plan's repeats 3). With
  per-depth slots the rows use different slots at the same step (vmap path);
  without, one shared call with masking."""
  model = build_random(**recurrent("concat", "normal", repeats=3, backprop_depth=2, **extra))
  toks = jnp.asarray(np.random.default_rng(3).integers(0, 61, (4, 7)), jnp.int32)
  targets = jnp.asarray(np.random.default_rng(4).integers(0, 61, (4, 7)), jnp.int32)
  loops, key = np.array([1, 5, 2, 3], np.int32), jax.random.key(7)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, toks, targets, loops):
    logits = nnx.merge(graphdef, p, rest)(toks, loops=loops, key=key)[0]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()
    return ce + 1e-3 * jnp.sum(logits**2), logits

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, logits), grads = grad(params, toks, targets, jnp.asarray(loops))
  alone = [grad(params, toks[b:b + 1], targets[b:b + 1], jnp.int32(r)) for b, r in enumerate(loops)]
  np.testing.assert_allclose(logits, jnp.concatenate([a[0][1] for a in alone]), rtol=1e-5, atol=1e-5)
  assert_trees_close(grads, jax.tree.map(lambda *g: sum(g), *[a[1] for a in alone]), rtol=1e-4, atol=1e-5)
  # The counts are really per row: the same rows all at the batch's longest count differ.
  np.testing.assert_raises(AssertionError, np.testing.assert_allclose, logits,
                           model(toks, loops=5, key=key)[0], rtol=1e-5, atol=1e-5)


def test_per_sequence_draw_is_per_row_and_reproducible():
  cfg = config_lib.load(tiny_config(**{**recurrent(), "model.recurrent.sample": "uniform",
                                       "model.recurrent.per_sequence": True, "model.recurrent.max_loops": 9}))
  rc = cfg.model.recurrent
  got = draw(rc, 3, seed=2, step=11, batch=16)
  assert got["loops"].shape == (16,) and got["loops"].dtype == np.int32 and len(set(got["loops"])) > 3
  again = draw(rc, 3, seed=2, step=11, batch=16)
  assert (again["loops"] == got["loops"]).all() and (again["key"] == got["key"]).all()
  assert (draw(rc, 3, seed=2, step=12, batch=16)["loops"] != got["loops"]).any()


@pytest.mark.slow
def test_per_sequence_counts_follow_their_rows_into_micro_batches():
  """A train step with one count per row: grad_accum=2 (strided micro-batches,
  each taking its rows' counts) gives the loss and update of grad_accum=1; the
  logged `loops` is the mean count; the counts really belong to their rows."""
  from recursive_lm import optim
  from recursive_lm.model.transformer import Transformer
  from recursive_lm.train_step import make_train_step
  cfg = config_lib.load(tiny_config(**recurrent("concat", repeats=3, backprop_depth=2, lora_rank=2, **{
      "model.recurrent.per_sequence": True, "model.recurrent.sample": "uniform", "model.recurrent.max_loops": 5})))
  toks = np.random.default_rng(0).integers(0, 61, (8, 8)).astype(np.int32)
  batch = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])}
  rec = draw(cfg.model.recurrent, 3, seed=0, step=1, batch=8)
  assert len(set(rec["loops"].tolist())) > 2

  def one_step(k, loops):
    model = Transformer(cfg.model, nnx.Rngs(0))
    tx, _ = optim.make(cfg.optim, 10, nnx.state(model, nnx.Param))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    state, m = make_train_step(graphdef, grad_accum=k, recurrent=True)(state, batch, {**rec, "loops": loops})
    return jax.device_get(m), jax.device_get(nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)))

  (m1, p1), (m2, p2) = one_step(1, rec["loops"]), one_step(2, rec["loops"])
  assert m1["loops"] == pytest.approx(rec["loops"].mean()) and m2["loops"] == m1["loops"]
  assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
  assert_trees_close(p2, p1, rtol=1e-4, atol=1e-6)
  m3, _ = one_step(1, rec["loops"][::-1].copy())
  assert abs(m3["loss"] - m1["loss"]) > 1e-5
