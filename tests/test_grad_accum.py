"""Gradient accumulation (optim.grad_accum = k): each step is one optimiser
update on the whole batch, whose k micro-batches a scan inside the jitted step
runs one after another.

- The step: k micro-batches give the loss, gradient, update and metrics of the
  unsplit batch, with ignored targets spread unevenly over the micro-batches
  (the weighting by valid-target counts) and with a MoEUT model (its balance
  regulariser); on a data-parallel mesh the micro-batch split moves no rows;
  a non-finite micro-batch skips the whole update (train.on_nonfinite=skip).
- train.run on a 4-device data-parallel mesh: grad_accum=2 follows grad_accum=1
  on the same batches step for step (loss, norms, evals); the logged learning
  rate is the schedule at every step; tokens count whole batches; a stop and
  resume reproduces the accumulated run bit for bit.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm import metrics, optim, sharding
from recursive_lm.model.transformer import Transformer
from recursive_lm.train_step import make_train_step, split_micro
from test_moe import moeut_cfg

import tiny_run

TIMING_KEYS = ("tokens_per_sec", "mfu")

# ----------------------------------------------------------------------------
# The step alone.


def one_step(cfg, batch, k):
  """(metrics, new params) of one train step from a fresh model (seed 0)."""
  model = Transformer(cfg.model, nnx.Rngs(0))
  tx, _ = optim.make(cfg.optim, 10, nnx.state(model, nnx.Param))
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  state, m = make_train_step(graphdef, grad_accum=k)(state, batch)
  params = nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
  return jax.device_get(m), jax.device_get(params)


def batch_with_uneven_targets(cfg, b=8, seed=0):
  """inputs/targets [b, T]; the even rows (micro-batch 0 of a k=2 split) keep only 2 targets each."""
  rng = np.random.default_rng(seed)
  t = cfg.data.seq_len
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  targets = tokens[:, 1:].copy()
  targets[0::2, 2:] = -1
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(targets)}


def test_split_micro_takes_strided_rows():
  x = jnp.arange(12).reshape(6, 2)
  np.testing.assert_array_equal(split_micro(x, 3), [[[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [10, 11]]])


@pytest.mark.devices(4)
def test_micro_batches_stay_on_their_devices():
  """On a 4-device data mesh the compiled k=2 step has no collective but the gradient all-reduce
  (splitting contiguous rows instead would gather and permute the batch)."""
  cfg = config_lib.load(tiny_run.config("batch=8"))
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])

  def init():
    model = Transformer(cfg.model, nnx.Rngs(0))
    tx, _ = optim.make(cfg.optim, 10, nnx.state(model, nnx.Param))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, state = nnx.split(sharding.create_sharded(init, mesh, cfg.mesh.rules))
  batch_sharding = sharding.batch_sharding(mesh, cfg.mesh.rules)
  step = make_train_step(graphdef, jax.tree.map(lambda x: x.sharding, state), batch_sharding, grad_accum=2)
  batch = {k: jax.ShapeDtypeStruct((8, cfg.data.seq_len), jnp.int32, sharding=batch_sharding)
           for k in ("inputs", "targets")}
  with sharding.mesh_context(mesh, cfg.mesh.rules):
    hlo = step.lower(state, batch).compile().as_text()
  ops = set(re.findall(r"\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", hlo))
  assert ops == {"all-reduce"}, ops


@pytest.mark.parametrize("model", ["dense", "moeut"])
def test_accumulated_step_equals_the_whole_batch_step(model):
  overrides = {"optim.warmup_steps": 0, "optim.lr": 1e-2}
  cfg = config_lib.load(tiny_config(**overrides)) if model == "dense" else moeut_cfg(**overrides)
  batch = batch_with_uneven_targets(cfg)
  m1, p1 = one_step(cfg, batch, 1)
  # Equal-weight averaging of the micro-batch means would be far off here: the
  # two micro-batches of k=2 hold 8 and 24 targets.
  for m, p in (one_step(cfg, batch, k) for k in ((2, 4) if model == "dense" else (2,))):
    assert set(m) == set(m1)
    for key in m1:
      if key.endswith("_dead"):  # experts unused in a micro-batch: a mean over micro-batches by design
        continue
      np.testing.assert_allclose(m[key], m1[key], rtol=2e-5, atol=1e-7, err_msg=key)
    # Adam's first step moves a weight by about lr * g / |g|: a gradient element
    # near zero turns rounding into up to ~1e-3 of lr (1e-5) in that weight.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5), p, p1)
  assert m1["update_norm"] > 0 and m1["learning_rate"] == pytest.approx(1e-2)
  if model == "moeut":
    assert m1["moe/balance_loss"] != 0


def test_a_nonfinite_micro_batch_skips_the_whole_update():
  cfg = config_lib.load(tiny_config(**{"optim.warmup_steps": 0, "optim.lr": 1e-2}))
  model = Transformer(cfg.model, nnx.Rngs(0))
  tx, _ = optim.make(cfg.optim, 10, nnx.state(model, nnx.Param), skip_nonfinite=True)
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  params = lambda s: jax.device_get(nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, s)[0], nnx.Param)))
  before = params(state)
  step = make_train_step(graphdef, grad_accum=2)
  good = batch_with_uneven_targets(cfg)
  bad = dict(good, inputs=good["inputs"].at[3, 1].set(cfg.model.vocab_size))  # row 3: micro-batch 1; NaN embedding
  state, m = step(state, bad)
  assert not m["finite"] and not np.isfinite(m["loss"]) and m["update_norm"] == 0.0
  jax.tree.map(np.testing.assert_array_equal, params(state), before)
  state, m = step(state, good)
  assert m["finite"] and m["update_norm"] > 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params(state)))


# ----------------------------------------------------------------------------
# train.run: grad_accum=2 vs grad_accum=1 on the same batches.

STEPS = 6
ARG = f"batch=8,steps={STEPS},eval_every=3,checkpoint_every=2,eval_batches=1"


def tiny(**overrides):
  return config_lib.load(tiny_run.config(ARG, **overrides))


def records(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in metrics.read(workdir)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Uninterrupted runs with grad_accum 1 and 2 on 4 devices (2 rows per device per micro-batch)."""
  from recursive_lm import train
  out = {}
  for k in (1, 2):
    wd = str(tmp_path_factory.mktemp(f"accum{k}"))
    train.run(tiny(**{"optim.grad_accum": k}), wd, devices=jax.devices()[:4])
    out[k] = records(wd)
  return out


def test_accumulated_run_follows_the_whole_batch_run(runs):
  one, two = runs[1], runs[2]
  assert [(r["step"], "loss" in r) for r in one] == [(r["step"], "loss" in r) for r in two]
  for r1, r2 in zip(one, two):
    assert set(r1) == set(r2)
    for key in r1:
      np.testing.assert_allclose(r2[key], r1[key], rtol=1e-4, err_msg=f"step {r1['step']} {key}")
  losses = [r["loss"] for r in two if "loss" in r]
  assert len(losses) == STEPS and losses[-1] < losses[0]


def test_logged_learning_rate_and_tokens(runs):
  cfg = tiny(**{"optim.grad_accum": 2})
  lr = optim.schedule(cfg.optim, cfg.train.steps)
  train = [r for r in runs[2] if "loss" in r]
  # The update of step s uses the schedule at optimiser count s - 1 (warmup: 0 at step 1).
  np.testing.assert_allclose([r["learning_rate"] for r in train], [float(lr(s - 1)) for s in range(1, STEPS + 1)],
                             rtol=1e-6)
  assert train[0]["learning_rate"] == 0.0 and train[0]["update_norm"] == 0.0
  assert all(r["update_norm"] > 0 for r in train[1:])
  assert [r["tokens"] for r in train] == [s * 8 * cfg.data.seq_len for s in range(1, STEPS + 1)]


@pytest.mark.slow
def test_accumulated_run_resumes_bit_exact(runs, tmp_path):
  from recursive_lm import train
  cfg = tiny(**{"optim.grad_accum": 2})
  wd = str(tmp_path / "resumed")
  first = train.run(cfg, wd, stop_at=3, devices=jax.devices()[:4])
  assert first["train"]["step"] == 3
  train.run(cfg, wd, devices=jax.devices()[:4])
  assert records(wd) == runs[2]
