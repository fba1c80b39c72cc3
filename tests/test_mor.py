"""Mixture-of-Recursions in training (recursive_lm/model/mor.py): the selection
against numpy, capacities respected exactly, gathered execution against the
masked reference (values and gradients), capacity 1 everywhere against the
plain recursive model, the accounting, the config errors, and training runs
through the CLI (router metrics, bit-exact resume after kill -9)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm.analysis import accounting
from recursive_lm.config import ConfigError
from recursive_lm.model.mor import select, step_sizes
from test_model import assert_trees_close, build_random, cross_entropy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 61


def routed(routing="expert", preset="middle_cycle", num_layers=8, repeats=3, **extra):
  """middle_cycle: first, 2 unique blocks x 3 recursions, last (with LoRA and per-depth norms)."""
  return dict(preset=preset, num_layers=num_layers, repeats=repeats, lora_rank=2, per_depth_norms=True,
              **{"model.mor.routing": routing}, **extra)


def toks(seed, b=3, t=13):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def value_and_grad(model, inputs, targets):
  """(objective, logits, aux), grads of CE + the model's regulariser (router loss included)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    m = nnx.merge(graphdef, p, rest)
    logits, _, aux = m(inputs)
    reg, _ = m.regulariser(aux)
    return cross_entropy(logits, targets) + reg, (logits, aux)

  (obj, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return obj, logits, aux, grads


# ----------------------------------------------------------------------------
# Selection and capacities.


def select_reference(score, candidate, k):
  """numpy: the k best candidates of each row by score, in position order, then fillers."""
  idx, valid = [], []
  for s, c in zip(score, candidate):
    cand = np.flatnonzero(c)
    best = np.sort(cand[np.argsort(-s[cand], kind="stable")][:k])
    idx.append(best)
    valid.append(np.ones(len(best), bool))
  return idx, valid


@pytest.mark.parametrize("k", [1, 4, 9, 12])
def test_selection_equals_numpy_reference(k):
  rng = np.random.default_rng(k)
  score = rng.standard_normal((5, 12)).astype(np.float32)
  candidate = rng.random((5, 12)) < np.array([[1.0], [0.8], [0.5], [0.2], [0.0]])  # rows with few candidates too
  idx, valid = (np.asarray(a) for a in jax.jit(select, static_argnums=2)(score, candidate, k))
  want_idx, _ = select_reference(score, candidate, k)
  assert idx.shape == valid.shape == (5, k)
  for row in range(5):
    n = len(want_idx[row])
    assert valid[row].tolist() == [True] * n + [False] * (k - n)
    np.testing.assert_array_equal(idx[row, :n], want_idx[row])
    fill = idx[row, n:]  # the rest: distinct non-candidates in position order, after every valid entry
    assert len(set(idx[row].tolist())) == k and not candidate[row, fill].any() and np.all(np.diff(fill) > 0)


def test_step_sizes_round_up_and_keep_exact_fractions():
  assert step_sizes((1.0, 2 / 3, 1 / 3), 3) == (3, 2, 1)
  assert step_sizes((1.0, 2 / 3, 1 / 3), 13) == (13, 9, 5)
  assert step_sizes((0.1, 0.01), 10) == (1, 1)


@pytest.mark.parametrize("t", [5, 13])
def test_expert_capacity_is_respected_exactly_and_sets_are_nested(t):
  model = build_random(**routed("expert", **{"model.mor.capacities": "0.9,0.5,0.2"}))
  _, _, aux = model(toks(0, t=t))
  depth = np.asarray(aux["router_depth"])
  sizes = step_sizes((0.9, 0.5, 0.2), t)
  for r, k in enumerate(sizes):
    np.testing.assert_array_equal((depth > r).sum(1), k)  # every row: exactly k_r tokens took step r


def test_token_routing_runs_each_token_at_most_its_depth_within_the_buffer():
  model = build_random(**routed("token", **{"model.mor.capacities": "1,0.6,0.3"}))
  x = toks(1)
  _, _, aux = model(x)
  depth = np.asarray(aux["router_depth"])
  # The depth each token was given: the router on the residual stream entering the routed stage.
  given = _given_depths(model, x)
  sizes = step_sizes((1.0, 0.6, 0.3), x.shape[1])
  assert np.all(depth <= given) and np.all(depth >= 1)
  for r, k in enumerate(sizes):
    # step r runs min(k_r, tokens still active that were given a depth > r) tokens of each row
    asked = ((given > r) & (depth >= r)).sum(1)
    np.testing.assert_array_equal((depth > r).sum(1), np.minimum(k, asked))


def _given_depths(model, x):
  from recursive_lm.model.recursion import apply_layer
  ctx, _ = model.context(x.shape[1])
  h = model.embed(x, jnp.float32)
  for layer in model.plan.stage_layers(0):
    h = apply_layer(model.stages[0], layer, h, ctx)[0]
  return np.asarray(jnp.argmax(model.router(h), -1)) + 1


# ----------------------------------------------------------------------------
# Gathered execution against the masked reference; capacity 1 against the plain model.


@pytest.mark.parametrize("routing,weighting,caps,kv", [
    ("expert", "scaled", "", "none"), ("expert", "unit", "0.8,0.8,0.4", "none"),
    ("token", "scaled", "1,0.6,0.3", "none"), ("token", "unit", "", "none"),
    ("expert", "scaled", "0.8,0.5,0.3", "recursion"), ("token", "scaled", "1,0.6,0.3", "recursion")])
def test_gathered_execution_equals_masked_execution(routing, weighting, caps, kv):
  """kv: 'none' is recursion-wise caching (a step attends to its own tokens),
  'recursion' recursion-wise sharing (later steps attend to step 0's K/V)."""
  extra = {"model.mor.weighting": weighting, "model.mor.capacities": caps, "model.mor.router_scale": 0.5,
           "model.kv_sharing": kv}
  gathered = build_random(**routed(routing, **extra))
  masked = build_random(**routed(routing, **extra, **{"model.mor.execution": "mask"}))
  x, y = toks(2), toks(3)
  obj_g, logits_g, aux_g, grads_g = value_and_grad(gathered, x, y)
  obj_m, logits_m, aux_m, grads_m = value_and_grad(masked, x, y)
  np.testing.assert_array_equal(aux_g["router_depth"], aux_m["router_depth"])
  assert len(set(np.asarray(aux_g["router_depth"]).ravel().tolist())) > 1  # tokens really went to different depths
  np.testing.assert_allclose(logits_g, logits_m, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(obj_g, obj_m, rtol=1e-6)
  assert_trees_close(grads_g, grads_m)
  for path, g in jax.tree_util.tree_leaves_with_path(grads_g["router"]):  # the LM loss and aux loss reach the router
    assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)


def _same_weights(src, dst):
  """dst with src's parameters (every shared path; dst's router kept)."""
  src_params = dict(nnx.to_flat_state(nnx.state(src, nnx.Param)))
  graphdef, params, rest = nnx.split(dst, nnx.Param, ...)
  flat = dict(nnx.to_flat_state(params))
  for path in flat:
    if path[0] != "router":
      flat[path] = src_params[path]
  return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


@pytest.mark.parametrize("preset,num_layers,kv", [("middle_cycle", 8, "none"), ("cycle", 6, "none"),
                                                   ("looped", 3, "none"), ("middle_cycle", 8, "recursion")])
def test_capacity_one_with_unit_weighting_equals_the_plain_recursive_model(preset, num_layers, kv):
  """With every capacity 1 every token takes every step; the unit weighting's
  update is f(h) in value (the scaled one would be h + s g (f(h) - h)), so
  logits and every shared parameter's gradient equal the plain model's (with
  recursion-wise KV sharing: the plain model with model.kv_sharing='recursion')."""
  repeats = 3
  kw = dict(preset=preset, num_layers=num_layers, repeats=repeats, lora_rank=2, per_depth_norms=True,
            **{"model.kv_sharing": kv})
  plain = build_random(**kw)
  mor = _same_weights(plain, build_random(**kw, **{"model.mor.routing": "expert", "model.mor.weighting": "unit",
                                                   "model.mor.capacities": "1,1,1"}))
  x, y = toks(4), toks(5)
  graphdef, params, rest = nnx.split(plain, nnx.Param, ...)
  loss = lambda p, unrolled: cross_entropy(nnx.merge(graphdef, p, rest)(x, unrolled=unrolled)[0], y)
  obj_p, grads_p = jax.jit(jax.value_and_grad(lambda p: loss(p, True)))(params)
  logits_u = plain(x, unrolled=True)[0]
  mgraph, mparams, mrest = nnx.split(mor, nnx.Param, ...)
  mloss = lambda p: cross_entropy(nnx.merge(mgraph, p, mrest)(x)[0], y)
  obj_m, grads_m = jax.jit(jax.value_and_grad(mloss))(mparams)
  np.testing.assert_allclose(mor(x)[0], logits_u, rtol=1e-5, atol=1e-5)  # the unrolled plain model
  np.testing.assert_allclose(mor(x)[0], plain(x)[0], rtol=1e-5, atol=1e-5)  # and the scanned one
  flat_m, flat_p = (dict(nnx.to_flat_state(g)) for g in (grads_m, grads_p))
  assert {p for p in flat_m if p[0] != "router"} == set(flat_p)
  for path, g in flat_p.items():
    np.testing.assert_allclose(flat_m[path], g, rtol=1e-5, atol=1e-5, err_msg=str(path))
  np.testing.assert_allclose(obj_m, obj_p, rtol=1e-6)


def test_scaled_weighting_moves_chosen_tokens_part_of_the_way():
  """scaled: a chosen token gets h + s g (f(h) - h); at capacity 1 with a tiny
  scale the model stays near its input, unlike the plain model."""
  kw = dict(preset="looped", num_layers=2, repeats=2)
  plain = build_random(**kw)
  small = _same_weights(plain, build_random(**kw, **{"model.mor.routing": "expert", "model.mor.capacities": "1,1",
                                                     "model.mor.router_scale": 1e-6}))
  x = toks(6)
  skip = plain.readout(plain.embed(x, jnp.float32))  # every block skipped
  np.testing.assert_allclose(small(x)[0], skip, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(plain(x)[0] - skip)).max() > 1e-2


# ----------------------------------------------------------------------------
# Accounting and config errors.


def test_active_flops_count_each_step_at_its_share_of_tokens():
  def flops(caps, all_recursions=False):
    cfg = config_lib.load(tiny_config(**routed("expert", **{"model.mor.capacities": caps})))
    return accounting.flops_per_token(cfg, cfg.data.seq_len, all_recursions=all_recursions), cfg

  plain_cfg = config_lib.load(tiny_config(**routed("none")))
  t = plain_cfg.data.seq_len
  plain = accounting.flops_per_token(plain_cfg, t)
  model = accounting.abstract_model(plain_cfg)
  routed_stage = model.stages[1]
  block = accounting._dense_matmul_params(routed_stage.blocks, plain_cfg.model)
  slots = accounting._dense_matmul_params(routed_stage.slots, plain_cfg.model)
  router = plain_cfg.model.d_model * 3
  attn_layer = 6 * t * plain_cfg.model.num_heads * plain_cfg.model.head_dim
  full, cfg = flops("1,1,1")
  assert full == plain + 6 * router
  active, _ = flops("1,0.5,0.25")
  share = [k / t for k in step_sizes((1, 0.5, 0.25), t)]  # seq_len 7: 7, 4, 2 tokens
  assert share == [1, 4 / 7, 2 / 7]
  expect = plain + 6 * router - round(6 * (3 - sum(share)) * (block + slots / 3)
                                      + 2 * attn_layer * (3 - sum(a * a for a in share)))
  assert abs(active - expect) <= 1
  assert flops("1,0.5,0.25", all_recursions=True)[0] == full


def test_active_flops_with_recursion_wise_kv_sharing():
  """Under model.kv_sharing='recursion' only step 0 runs K/V projections (on
  its share of tokens) and later steps attend to step 0's keys."""
  def flops(caps, kv):
    over = {"model.kv_sharing": kv, **({"model.mor.capacities": caps} if caps else {})}
    cfg = config_lib.load(tiny_config(**routed("expert" if caps else "none", **over)))
    return accounting.flops_per_token(cfg, cfg.data.seq_len), cfg

  (plain_none, cfg), (plain_rec, _) = flops(None, "none"), flops(None, "recursion")
  t, d = cfg.data.seq_len, cfg.model
  kv_proj = 2 * d.d_model * d.num_kv_heads * d.head_dim  # per layer; plus k/v LoRA (rank 2) per depth
  kv_lora = 2 * 2 * (d.d_model + d.num_kv_heads * d.head_dim)
  attn_layer = 6 * t * d.num_heads * d.head_dim
  assert plain_none - plain_rec == 6 * 2 * 2 * (kv_proj + kv_lora)  # 2 blocks x 2 later repeats read
  share = [k / t for k in step_sizes((0.5, 0.5, 0.25), t)]  # 4, 4, 2 of 7
  got, _ = flops("0.5,0.5,0.25", "recursion")
  none_got, _ = flops("0.5,0.5,0.25", "none")
  # Against the non-shared routed model: step 0's K/V run at share[0] in both; steps 1, 2 drop theirs
  # (projections and k/v adapters) and attend to step 0's 4 keys instead of their own.
  want = none_got - 6 * 2 * (share[1] + share[2]) * (kv_proj + kv_lora) + 2 * attn_layer * (
      share[1] * share[0] + share[2] * share[0] - share[1] ** 2 - share[2] ** 2)
  assert abs(got - want) <= 2, (got, want)


@pytest.mark.parametrize("overrides,message", [
    ({"model.mor.routing": "depth"}, "model.mor.routing='depth' is not one of ['none', 'expert', 'token']"),
    ({"model.mor.capacities": "1,0.5,0.75"}, "model.mor.capacities='1,0.5,0.75': capacities must not increase"),
    ({"model.mor.capacities": "1,0.5,0"}, "model.mor.capacities='1,0.5,0': capacity 0.0 is outside (0, 1]"),
    ({"model.mor.capacities": "1.5,1,1"}, "model.mor.capacities='1.5,1,1': capacity 1.5 is outside (0, 1]"),
    ({"model.mor.capacities": "1,0.5"}, "model.mor.capacities='1,0.5' has 2 values; the routed stage has 3"),
    ({"model.mor.capacities": "1,a,b"}, "model.mor.capacities='1,a,b' is not a comma-separated list"),
    ({"model.mor.weighting": "tanh"}, "model.mor.weighting='tanh' is not one of"),
    ({"model.mor.router_scale": 0.0}, "model.mor.router_scale=0.0 must be > 0"),
    ({"preset": "vanilla"}, "model.mor.routing needs a plan with exactly one repeated stage (the loop); this plan has 0"),
    ({"preset": "middle_sequence"}, "model.mor.routing needs the loop 'middle' in cycle order (1-2-3 1-2-3), not 'sequence'"),
    ({"model.kv_sharing": "cla:2"}, "model.kv_sharing='cla:2' is not supported with model.mor.routing"),
    ({"model.sliding_window": 4}, "model.sliding_window=4 is not supported with model.mor.routing"),
])
def test_bad_mor_config_is_one_line_naming_field_and_value(overrides, message):
  with pytest.raises(ConfigError) as e:
    config_lib.load(tiny_config(**{**routed("expert"), **overrides}))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_capacities_without_routing_is_an_error():
  with pytest.raises(ConfigError, match="model.mor.capacities='1,0.5' is set but model.mor.routing='none'"):
    config_lib.load(tiny_config(**{**routed("none"), "model.mor.capacities": "1,0.5"}))


def test_training_routing_with_a_kv_cache_is_refused_not_wrong():
  """Top-k over the sequence is not causal: a cache takes generation's threshold
  routing only (tests/test_mor_generate.py)."""
  model = build_random(**routed("expert"))
  with pytest.raises(ValueError, match="routing='topk'"):
    model(toks(0), cache=model.init_cache(3, 16), cache_index=jnp.asarray(0), routing="topk")


@pytest.mark.parametrize("routing", ["expert", pytest.param("token", marks=pytest.mark.slow)])
def test_train_step_reports_router_metrics_and_accumulation_keeps_them(routing):
  """The train step's metrics carry router/*; with 2 micro-batches they are the
  whole batch's (per-row means), and the update matches the unsplit step."""
  from test_grad_accum import one_step
  cfg = config_lib.load(tiny_config(**routed(routing), **{"data.batch_size": 4}))
  rng = np.random.default_rng(0)
  data = rng.integers(0, V, (4, cfg.data.seq_len + 1)).astype(np.int32)
  batch = {"inputs": jnp.asarray(data[:, :-1]), "targets": jnp.asarray(data[:, 1:])}
  (m1, p1), (m2, p2) = one_step(cfg, batch, 1), one_step(cfg, batch, 2)
  keys = {k for k in m1 if "router" in k}
  assert keys == {"router/aux_loss", "router/loss", "router/depth_frac", "router/step_frac"}
  for k in keys:
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert m1["router/depth_frac"].shape == (4,) and m1["router/step_frac"][0] == 1.0
  assert_trees_close(p2, p1, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------
# Analysis: which tokens go deep.


class _Run:
  """What analysis.router_depths reads of a Run: cfg, model, eval_batches."""

  def __init__(self, cfg, model, batches):
    self.cfg, self.model, self._batches = cfg, model, batches

  def eval_batches(self, n=None):
    return self._batches[:n]


def test_router_depths_summarise_the_models_own_routing():
  from recursive_lm import analysis
  from recursive_lm.analysis import plots
  over = routed("expert", **{"model.mor.capacities": "1,0.6,0.3"})
  cfg, model = config_lib.load(tiny_config(**over)), build_random(**over)
  batches = [{"inputs": np.asarray(toks(s))} for s in (7, 8)]
  d = analysis.router_depths(_Run(cfg, model, batches))
  want = np.concatenate([np.asarray(model(jnp.asarray(b["inputs"]))[2]["router_depth"]) for b in batches])
  np.testing.assert_array_equal(d.depth, want)
  ids = np.concatenate([b["inputs"] for b in batches])
  np.testing.assert_allclose(d.depth_frac, [np.mean(want == k) for k in range(4)])
  np.testing.assert_allclose(d.by_position, want.mean(0))
  t = int(ids[0, 0])
  assert d.by_token[t] == pytest.approx((want[ids == t].mean(), (ids == t).sum()))
  assert len(plots.plot_router_depths(d, decode=lambda i: chr(i + 40)).axes) == 3
  plain = analysis.router_depths(_Run(config_lib.load(tiny_config(**routed("none"))), None, batches))
  assert not plain and "no routers" in plain.message
  assert plots.plot_router_depths(plain) is not None
  with pytest.raises(ValueError, match="the layer-by-layer probes do not apply the routers"):
    analysis.hidden_states(model, toks(0))


# ----------------------------------------------------------------------------
# The CLI: configs/mor.py, router metrics, describe, kill -9 and resume.


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = REPO
  return env


def _cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=_env())


def test_describe_reports_active_flops_and_bad_capacities_fail_before_building():
  out = _cli("recursive_lm.describe", "--config", "configs/mor.py:size=tiny")
  assert out.returncode == 0, out.stderr
  d = json.loads(out.stdout)
  assert d["mor_routing"] == "expert" and d["mor_tokens_per_step"] == [32, 22, 11]
  assert d["flops_per_token"] < d["flops_per_token_all_recursions"]
  bad = _cli("recursive_lm.describe", "--config", "configs/mor.py:size=tiny",
             "--config.model.mor.capacities=1,0.2,0.5")
  assert bad.returncode == 2 and bad.stdout == ""
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: model.mor.capacities='1,0.2,0.5': capacities must not increase from one recursion step to the next "
      "(0.2 -> 0.5)")


TRAIN_ARGS = ("--config.train.steps=6", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
              "--config.train.eval_every=6", "--config.train.eval_batches=1", "--config.data.batch_size=4")


def _train(config, workdir, *extra):
  return [sys.executable, "-m", "recursive_lm.train", "--config", config, "--workdir", str(workdir), *TRAIN_ARGS,
          *extra]


def _records(workdir):
  from recursive_lm import metrics
  return [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")} for r in metrics.read(str(workdir))]


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["expert", "token"])
def test_training_logs_router_statistics(routing, tmp_path):
  run = subprocess.run(_train(f"configs/mor.py:size=tiny,routing={routing}", tmp_path / "wd"), cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=_env())
  assert run.returncode == 0, run.stderr[-3000:]
  train = [r for r in _records(tmp_path / "wd") if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, 7))
  for r in train:
    assert len(r["router/depth_frac"]) == 4 and abs(sum(r["router/depth_frac"]) - 1) < 1e-5
    assert len(r["router/step_frac"]) == 3 and r["router/aux_loss"] > 0
    if routing == "expert":  # seq_len 32: 32, 22, 11 tokens per step
      np.testing.assert_allclose(r["router/step_frac"], [1, 22 / 32, 11 / 32], rtol=1e-6)
    else:
      assert all(a >= b for a, b in zip(r["router/step_frac"], r["router/step_frac"][1:]))
  assert math.isfinite(train[-1]["loss"])


@pytest.mark.slow
def test_kill9_then_resume_is_bit_exact(tmp_path):
  """A run killed (SIGKILL) after its step-2 checkpoint and relaunched ends
  with the same metrics, router statistics included, as an uninterrupted run."""
  config = "configs/mor.py:size=tiny"
  ref = subprocess.Popen(_train(config, tmp_path / "ref"), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
  wd = tmp_path / "wd"
  log = open(tmp_path / "killed.log", "w")
  victim = subprocess.Popen(_train(config, wd), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
  from test_reliability import finalized_steps
  deadline, ready = time.time() + 900, False
  while time.time() < deadline and victim.poll() is None and not ready:  # checkpoint 2 final, step 3 logged
    ready = 2 in finalized_steps(wd) and '"step": 3' in (wd / "metrics.jsonl").read_text()
    time.sleep(0.05)
  assert ready and victim.poll() is None, "not killed after step 3: " + (tmp_path / "killed.log").read_text()
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  again = subprocess.run(_train(config, wd), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step" in again.stdout
  assert ref.wait(timeout=600) == 0
  want, got = _records(tmp_path / "ref"), _records(wd)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  assert got == want
