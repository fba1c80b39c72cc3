"""Per-loop readout losses (train.exit_loss_weights, `train_step.loss_fn`).

- Weights that are 0 except the last loop give the plain objective and gradient.
- The weighted objective and its gradient equal a hand-written reference that
  walks the plan layer by layer (`recursion.apply_layer`) and reads out the
  residual stream after each loop through the final norm and head, on the
  scanned stage, the unrolled stage, a plan with a stage after the loops and
  recursion KV sharing.
- The train step logs loss_loop_1 .. loss_loop_N (the last equals loss), also
  accumulated over micro-batches; a training run writes them to metrics.jsonl.
- Bad weights: one ConfigError line naming the field.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm import optim
from recursive_lm.config import ConfigError
from recursive_lm.model.recursion import apply_layer
from recursive_lm.train_step import loss_fn, make_train_step, token_losses

from test_decode import V, build
from test_train_e2e import tiny

WINDOWED = dict(preset="cycle", num_layers=6, repeats=3, lora_rank=2, **{
    "model.sliding_window": 3, "model.global_every": 2, "model.rope_base_local": 100.0})


def _batch(b=3, t=7, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, (b, t + 1)).astype(np.int32)
  targets = tokens[:, 1:].copy()
  targets[0, :3] = -1  # ignored targets count in neither
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(targets)}


def _reference(model, batch, weights):
  """sum_j w_j CE(readout(state after loop j)), the last loop read out after the rest of the depth."""
  plan = model.plan
  ctx, _ = model.context(batch["inputs"].shape[1])
  x = model.embed(batch["inputs"], jnp.float32)
  n = jnp.maximum((batch["targets"] >= 0).sum(), 1).astype(jnp.float32)
  ce = lambda logits: token_losses(logits, batch["targets"])[0].sum() / n
  store, loop_ces = {}, []
  for layer in plan.layers():
    spec = plan.stages[layer.stage]
    entry = None if (plan.kv_sharing == "none" or layer.kv_write) else store[layer.kv_slot]
    x, entry, _ = apply_layer(model.stages[layer.stage], layer, x, ctx, entry)
    if plan.kv_sharing != "none" and layer.kv_write:
      store[layer.kv_slot] = entry
    if spec.order == "cycle" and spec.repeats > 1 and layer.block == spec.unique_blocks - 1 \
        and layer.repeat < spec.repeats - 1:
      loop_ces.append(ce(model.readout(x)))
  loop_ces.append(ce(model.readout(x)))
  assert len(loop_ces) == len(weights)
  return sum(w * l for w, l in zip(weights, loop_ces)), loop_ces


def _grads(model, batch, weights, reference=False):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  n = jnp.maximum((batch["targets"] >= 0).sum(), 1).astype(jnp.float32)
  if reference:
    f = lambda p: _reference(nnx.merge(graphdef, p, rest), batch, weights)
  else:
    f = lambda p: (lambda o, a: (o, [a[3][f"loss_loop_{j + 1}"] for j in range(len(a[3]))] if weights else [a[0]]))(
        *loss_fn(p, graphdef, rest, batch, n, 1, None, weights))
  (obj, loops), g = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  return float(obj), [float(l) for l in loops], g


CASES = {
    "scanned_windows_lora": (WINDOWED, (0.2, 0.3, 1.0)),
    "unrolled": ({**WINDOWED, "model.scan": False}, (0.5, 0.0, 2.0)),
    "middle_cycle": (dict(preset="middle_cycle", num_layers=6, repeats=2, lora_rank=2), (0.7, 0.4)),
    "recursion_kv": ({**WINDOWED, "model.global_every": 0, "model.kv_sharing": "recursion"}, (1.0, 0.5, 0.25)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_weighted_loss_and_gradient_equal_the_reference(case):
  overrides, weights = CASES[case]
  model, batch = build(**overrides), _batch()
  obj, loops, g = _grads(model, batch, weights)
  ref_obj, ref_loops, ref_g = _grads(model, batch, weights, reference=True)
  np.testing.assert_allclose(obj, ref_obj, rtol=1e-5)
  np.testing.assert_allclose(loops, ref_loops, rtol=1e-5)
  assert len(set(np.round(loops, 4))) == len(loops)  # the loops' readouts really differ
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_only_the_last_weight_is_the_plain_loss():
  model, batch = build(**WINDOWED), _batch(seed=1)
  plain, (plain_ce,), g_plain = _grads(model, batch, ())
  obj, loops, g = _grads(model, batch, (0.0, 0.0, 1.0))
  np.testing.assert_allclose(obj, plain, rtol=1e-6)
  np.testing.assert_allclose(loops[-1], plain_ce, rtol=1e-6)
  assert loops[0] != loops[-1]
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_train_step_logs_each_loop_and_accumulates():
  cfg = config_lib.load(tiny_config(**WINDOWED, **{"data.batch_size": 4, "train.exit_loss_weights": "0.2,0.3,1"}))
  assert cfg.train.exit_loss_weights == (0.2, 0.3, 1.0)
  batch = _batch(b=4, seed=2)
  out = []
  for k in (1, 2):
    from recursive_lm.model.transformer import Transformer
    model = Transformer(cfg.model, nnx.Rngs(0))
    tx, _ = optim.make(cfg.optim, 10, nnx.state(model, nnx.Param))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    _, m = make_train_step(graphdef, grad_accum=k, exit_weights=cfg.train.exit_loss_weights)(state, batch)
    out.append(jax.device_get(m))
  for m in out:
    assert {"loss_loop_1", "loss_loop_2", "loss_loop_3"} <= set(m)
    np.testing.assert_allclose(m["loss_loop_3"], m["loss"], rtol=1e-6)
    np.testing.assert_allclose(m["total_loss"], 0.2 * m["loss_loop_1"] + 0.3 * m["loss_loop_2"] + m["loss"],
                               rtol=1e-5)
  for key in ("loss_loop_1", "loss_loop_2", "total_loss", "grad_norm"):
    np.testing.assert_allclose(out[0][key], out[1][key], rtol=1e-4)


@pytest.mark.parametrize("value,needle", [
    ("1,1", "has 2 weights; the plan has 3 loops"),
    ("0.5,-1,1", "must be >= 0"),
    ("0.5,x,1", "comma-separated numbers"),
    ("0,0,0", "positive sum"),
])
def test_bad_weights_are_one_line_naming_the_field(value, needle):
  with pytest.raises(ConfigError) as info:
    config_lib.load(tiny_config(**WINDOWED, **{"train.exit_loss_weights": value}))
  msg = str(info.value)
  assert "\n" not in msg and "train.exit_loss_weights" in msg and needle in msg, msg


def test_weights_on_a_plan_without_loops_are_refused():
  with pytest.raises(ConfigError, match="train.exit_loss_weights.*no repeated cycle-order stage"):
    config_lib.load(tiny_config(preset="vanilla", num_layers=2, **{"train.exit_loss_weights": "1"}))
  with pytest.raises(ConfigError, match="train.exit_loss_weights.*no repeated cycle-order stage"):
    config_lib.load(tiny_config(preset="sequence", num_layers=4, repeats=2, **{"train.exit_loss_weights": "1,1"}))


def test_training_run_writes_loop_losses(tmp_path):
  from recursive_lm import train
  workdir = str(tmp_path / "run")
  train.run(tiny(**{"train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
                    "train.exit_loss_weights": "0.5,1"}), workdir)
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in records if "loss" in r]
  assert len(train) == 2
  for r in train:
    assert r["loss_loop_2"] == pytest.approx(r["loss"], rel=1e-6) and r["loss_loop_1"] > 0
    assert r["total_loss"] == pytest.approx(0.5 * r["loss_loop_1"] + r["loss"], rel=1e-5)
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["train"]["exit_loss_weights"] == [0.5, 1.0]
