"""MoEUT pieces against references: sigma-MoE vs a dense ReLU MLP and a numpy
loop, every dispatch against the dense one (values and gradients), the balance
regulariser against a hand computation, the grouped MoEUT model scanned vs
unrolled, SwitchHead cache decoding vs a full forward, the data-parallel
dispatch under a mesh, config validation and the presets' parameter counts.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm.config import ConfigError
from recursive_lm.model import dispatch, moe, moeut_block
from recursive_lm import plan as plan_lib
from recursive_lm import sharding
from recursive_lm.model.transformer import Transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
D, E, S, K = 24, 7, 8, 3
MODES = ("loop", "blocks", "ragged", "dense")


def rand(shape, seed=0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def sigma_moe(top_k=K, dispatch="loop", experts=E) -> moe.SigmaMoE:
  return moe.SigmaMoE(D, experts, S, top_k, 1.0, nnx.Rngs(0), dispatch=dispatch)


def set_mode(model, mode):
  for _, m in nnx.iter_graph(model):
    if hasattr(m, "dispatch"):
      m.dispatch = mode


def moeut_cfg(**overrides):
  """A 4-layer MoEUT (2 unique blocks cycled twice) on conftest's tiny shapes. The model-level
  tests use the dense dispatch (cheapest to compile); the kernels are checked against it above."""
  base = {"model.block": "moeut", "model.norm": "layer", "model.num_kv_heads": 3, "model.moe.experts": 7,
          "model.moe.expert_size": 8, "model.moe.top_k": 3, "model.moe.att_experts": 3, "model.moe.dispatch": "dense",
          "preset": "cycle", "num_layers": 4, "repeats": 2}
  return config_lib.load(tiny_config(**{**base, **overrides}))


def jit_call(module, *args, **kwargs):
  """module(*args, **kwargs) as one compiled program (eager op-by-op dispatch is what makes tests slow)."""
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kwargs))(state, *args)


def tokens(seed=0, b=2, t=7):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 61, (b, t)), jnp.int32)


# ----------------------------------------------------------------------------
# sigma-MoE


@pytest.mark.parametrize("mode", MODES)
def test_all_experts_with_constant_router_is_half_the_concatenated_dense_mlp(mode):
  """Router weights 0 -> every sigmoid score is 0.5; with K = E every expert
  runs, so the layer is 0.5 * relu(x @ W1) @ W2 with W1 = [keys_1 .. keys_E]
  along the hidden axis and W2 = [values_1; ..; values_E]."""
  layer = sigma_moe(top_k=E, dispatch=mode)
  layer.router[...] = jnp.zeros_like(layer.router[...])
  x = rand((2, 5, D))
  y, aux = jit_call(layer, x)
  w1 = jnp.transpose(layer.keys[...], (1, 0, 2)).reshape(D, E * S)
  w2 = layer.values[...].reshape(E * S, D)
  np.testing.assert_allclose(y, 0.5 * jax.nn.relu(x @ w1) @ w2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["mlp_usage"], np.ones(E))  # every token chose every expert
  np.testing.assert_allclose(aux["mlp_probs"], np.full((2, E), 1 / E), rtol=1e-6)


def test_topk_selection_and_output_match_numpy():
  layer = sigma_moe()
  x, r_in = rand((2, 5, D), 1), rand((2, 5, D), 2)
  logits = np.asarray(r_in.reshape(10, D) @ layer.router[...])
  gate, idx = moe.route(jnp.asarray(logits), K)
  ref_idx = np.argsort(-logits, axis=-1)[:, :K]
  np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(ref_idx, -1))
  np.testing.assert_allclose(gate, 1 / (1 + np.exp(-np.take_along_axis(logits, np.asarray(idx), -1))), rtol=1e-6)
  y, aux = jit_call(layer, x, r_in)
  keys, values, xf = np.asarray(layer.keys[...]), np.asarray(layer.values[...]), np.asarray(x).reshape(10, D)
  ref = np.zeros((10, D))
  for n in range(10):
    for e in ref_idx[n]:
      ref[n] += 1 / (1 + np.exp(-logits[n, e])) * np.maximum(xf[n] @ keys[e], 0) @ values[e]
  np.testing.assert_allclose(np.asarray(y).reshape(10, D), ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(aux["mlp_usage"], np.bincount(ref_idx.ravel(), minlength=E) / 10, rtol=1e-6)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(aux["mlp_probs"], p.reshape(2, 5, E).mean(1), rtol=1e-5)


@pytest.mark.parametrize("mode", ("loop", "blocks", "ragged"))
def test_dispatch_values_and_gradients_match_dense(mode):
  """Also: the gradient reaches the router (through the gates and the softmax
  statistics) and every expert."""
  layer = sigma_moe(dispatch=mode)
  graphdef, params = nnx.split(layer)
  x, r_in = rand((3, 6, D), 3), rand((3, 6, D), 4)

  def loss(p, x, m):
    mod = nnx.merge(graphdef, p)
    mod.dispatch = m
    y, aux = mod(x, r_in)
    return jnp.sum(y * y) + jnp.sum(aux["mlp_probs"] * jnp.arange(E)), y

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
  (_, y), g = grad(params, x, mode)
  (_, y_ref), g_ref = grad(params, x, "dense")
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(g[0]["router"][...])).min() > 0
  assert (np.abs(np.asarray(g[0]["keys"][...])).sum((1, 2)) > 0).all()
  assert (np.abs(np.asarray(g[0]["values"][...])).sum((1, 2)) > 0).all()


def test_layout_blocks_hold_one_group_and_every_assignment_once():
  group = jnp.asarray(np.random.default_rng(0).integers(0, 5, 101), jnp.int32)
  lay = dispatch.plan_layout(group, 5, "loop", cap=16)
  assert lay.block == dispatch.block_rows(101, 5, 16) == 16
  slot, valid, bg = np.asarray(lay.slot), np.asarray(lay.valid), np.asarray(lay.block_group)
  used = int(lay.n_blocks)
  assert sorted(slot[valid]) == list(range(101)) and not valid[used * lay.block:].any()
  rows_group = np.repeat(bg, lay.block)
  np.testing.assert_array_equal(rows_group[valid], np.asarray(group)[slot[valid]])
  assert dispatch.block_rows(6, 155, 128) == 8 and dispatch.block_rows(49152, 155, 128) == 128
  sorted_group, order = dispatch.sort_by_group(group, 5)  # the packed-key sort is numpy's stable argsort
  np.testing.assert_array_equal(order, np.argsort(np.asarray(group), kind="stable"))
  np.testing.assert_array_equal(sorted_group, np.sort(np.asarray(group)))


def test_batched_blocks_layout_pads_at_most_a_quarter():
  """The 'blocks' dispatch computes all ceil(A / b) + G - 1 blocks: b keeps that near A."""
  assert dispatch.batched_block_rows(49152, 155, 512) == 64  # 44M sigma-MoE, 4096 tokens: 922 blocks
  assert dispatch.batched_block_rows(6, 155, 512) == 8 and dispatch.batched_block_rows(10**6, 4, 128) == 128
  for a, g in [(49152, 155), (196608, 155), (8192, 64), (3000, 7)]:
    b = dispatch.batched_block_rows(a, g, 4096)
    assert (-(-a // b) + g - 1) * b <= 1.25 * a + b
  group = jnp.asarray(np.random.default_rng(1).integers(0, 5, 203), jnp.int32)
  lay = dispatch.plan_layout(group, 5, "blocks", cap=512)
  slot, valid = np.asarray(lay.slot), np.asarray(lay.valid)
  assert lay.block == 8 and sorted(slot[valid]) == list(range(203))
  np.testing.assert_array_equal(np.repeat(np.asarray(lay.block_group), 8)[valid], np.asarray(group)[slot[valid]])


@pytest.mark.parametrize("mode", ("loop", "blocks", "ragged"))
def test_moeut_model_dispatch_matches_dense(mode):
  """The whole MoEUT model (SwitchHead and sigma-MoE) with each dispatch: logits and gradients as dense."""
  cfg = moeut_cfg()
  model = Transformer(cfg.model, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  toks = tokens(2)

  def loss(p, m):
    mod = nnx.merge(graphdef, p, rest)
    set_mode(mod, m)
    logits = mod(toks)[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, lg), g = grad(params, mode)
  (_, lg_ref), g_ref = grad(params, "dense")
  np.testing.assert_allclose(lg, lg_ref, rtol=1e-5, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_tiered_layout_and_its_kernel_match_a_direct_computation():
  """plan_tiers: blocks of 64, 32, 16 and 8 rows each hold one group, every
  assignment sits in exactly one row, each group is padded by less than the
  smallest tier; the loop kernel over all tiers gives the values and
  gradients of a per-assignment computation."""
  rng = np.random.default_rng(0)
  n, d, s, g, a = 40, 6, 5, 5, 300
  group = jnp.asarray(rng.choice(g, a, p=[0.5, 0.3, 0.1, 0.07, 0.03]), jnp.int32)
  tiers = dispatch.plan_tiers(group, g, cap=64, granule=8)
  assert tiers.block == (64, 32, 16, 8)
  slot, valid = np.asarray(tiers.slot), np.asarray(tiers.valid)
  used_rows = []
  for start, count, block_group, b in zip(tiers.start, tiers.count, tiers.group, tiers.block):
    for j in range(int(count)):
      rows = slice(int(start) + j * b, int(start) + (j + 1) * b)
      assert (np.asarray(group)[slot[rows][valid[rows]]] == int(block_group[j])).all()
      used_rows.append(np.arange(len(slot))[rows])
  used = np.concatenate(used_rows)
  assert len(set(used)) == len(used) and sorted(slot[valid]) == list(range(a)) and not valid[np.setdiff1d(
      np.arange(len(slot)), used)].any()
  sizes = np.bincount(np.asarray(group), minlength=g)
  assert len(used) - a == sum(-(-c // 8) * 8 - c for c in sizes)  # padding below 8 rows per group

  x, keys, values, gate = rand((n, d), 1), rand((g, d, s), 2), rand((g, s, d), 3), rand((a,), 4)
  token = jnp.asarray(rng.integers(0, n, a), jnp.int32)

  def direct(x, keys, values, gate):
    h = jax.nn.relu(jnp.einsum("ad,ads->as", x[token], keys[group])) * gate[:, None]
    return jnp.zeros((n, d)).at[token].add(jnp.einsum("as,asd->ad", h, values[group]))

  tiered = lambda *args: dispatch.expert_mlp(args[0], args[1], args[2], tiers, "loop", token, args[3])
  np.testing.assert_allclose(tiered(x, keys, values, gate), direct(x, keys, values, gate), rtol=1e-5, atol=1e-5)
  w = rand((n, d), 5)
  ours = jax.grad(lambda *p: jnp.vdot(tiered(*p), w), (0, 1, 2, 3))(x, keys, values, gate)
  ref = jax.grad(lambda *p: jnp.vdot(direct(*p), w), (0, 1, 2, 3))(x, keys, values, gate)
  for o, r in zip(ours, ref):
    np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-5)


def test_loop_dispatch_with_more_experts_than_tokens():
  """Decoding sizes: 2 tokens, 7 experts; most experts and blocks unused."""
  layer = sigma_moe()
  x = rand((2, 1, D), 5)
  y = jit_call(layer, x)[0]
  layer.dispatch = "dense"
  np.testing.assert_allclose(y, jit_call(layer, x)[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Balance regulariser


def test_balance_loss_matches_hand_computation():
  """Plan: 2 unique blocks cycled twice (depths 0, 2 -> block 0; 1, 3 -> block 1)."""
  plan = plan_lib.build("cycle", 4, 2)
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(5), size=(4, 3))  # [L, B, E]
  att = rng.dirichlet(np.ones(3), size=(4, 3, 2))  # [L, B, H, Ea]
  usage = rng.uniform(0, 1, (4, 5))
  usage[0, 1] = usage[2, 1] = 0.0  # block 0, expert 1: dead at both repeats
  usage[1, 2] = 0.0  # block 1, expert 2: used at depth 3, not dead
  aux = {"mlp_probs": jnp.asarray(probs), "mlp_usage": jnp.asarray(usage), "resid_rms": jnp.ones(4),
         "att_v_probs": jnp.asarray(att), "att_o_probs": jnp.asarray(att[::-1]),
         "att_v_usage": jnp.ones((4, 2, 3)), "att_o_usage": jnp.ones((4, 2, 3))}
  cfg = moeut_cfg()
  loss, metrics = moe.balance_loss(aux, plan, cfg.model)

  def negent(p):  # mean over leading axes of sum p log p
    return float(np.mean(np.sum(p * np.log(p), -1)))

  mlp = sum(negent((probs[a] + probs[b]) / 2) for a, b in ((0, 2), (1, 3)))
  o = att[::-1]
  att_sum = sum(negent((att[a] + att[b]) / 2) + negent((o[a] + o[b]) / 2) for a, b in ((0, 2), (1, 3)))
  np.testing.assert_allclose(metrics["moe/mlp_balance"], mlp, rtol=1e-5)
  np.testing.assert_allclose(metrics["moe/att_balance"], att_sum, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.01 * mlp + 0.001 * att_sum, rtol=1e-5)
  assert int(metrics["moe/mlp_dead"]) == 1 and int(metrics["moe/att_dead"]) == 0
  np.testing.assert_allclose(metrics["moe/mlp_frac"], np.stack([usage[[0, 2]].mean(0), usage[[1, 3]].mean(0)]))
  # Uniform routing is the minimum: -log(E) per block.
  uniform = dict(aux, mlp_probs=jnp.full((4, 3, 5), 0.2))
  np.testing.assert_allclose(moe.balance_loss(uniform, plan, cfg)[1]["moe/mlp_balance"], 2 * -np.log(5), rtol=1e-6)
  # A dense model's aux has no router statistics: no loss.
  assert moe.balance_loss({"resid_rms": jnp.ones(4)}, plan, cfg)[1] == {}


@pytest.mark.parametrize("preset,layers,repeats", [("sequence", 6, 3), ("middle_cycle", 6, 2), ("sandwich", 5, 1)])
def test_balance_loss_groups_repeats_like_plan_layers(preset, layers, repeats):
  """The reshape-based grouping equals averaging over plan.layers() entries of each (stage, block)."""
  plan = plan_lib.build(preset, layers, repeats)
  rng = np.random.default_rng(1)
  probs = rng.dirichlet(np.ones(4), size=(plan.depth, 2))
  usage = rng.uniform(0, 1, (plan.depth, 4))
  loss, metrics = moe.balance_loss({"mlp_probs": jnp.asarray(probs), "mlp_usage": jnp.asarray(usage)}, plan,
                                   moeut_cfg().model)
  groups = {}
  for layer in plan.layers():
    groups.setdefault((layer.stage, layer.block), []).append(layer.depth)
  ref = sum(np.mean(np.sum(p * np.log(p), -1)) for p in (probs[d].mean(0) for d in groups.values()))
  np.testing.assert_allclose(metrics["moe/mlp_balance"], ref, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.01 * ref, rtol=1e-5)
  np.testing.assert_allclose(metrics["moe/mlp_frac"], np.stack([usage[d].mean(0) for d in groups.values()]),
                             rtol=1e-6)


# ----------------------------------------------------------------------------
# The MoEUT model


def test_grouped_moeut_scan_equals_unrolled_with_gradients():
  """G = 2 unique blocks in a 4-layer cycle: nested scans vs the Python loop,
  logits, aux and the gradient of CE + balance loss w.r.t. every parameter."""
  cfg = moeut_cfg()
  model = Transformer(cfg.model, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  toks = tokens(1)

  def loss(p, unrolled):
    m = nnx.merge(graphdef, p, rest)
    logits, _, aux = m(toks, unrolled=unrolled)
    reg, _ = moe.balance_loss(aux, m.plan, cfg.model)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + reg, (logits, aux)

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, (lg, aux)), g = grad(params, False)
  (_, (lg_ref, aux_ref)), g_ref = grad(params, True)
  np.testing.assert_allclose(lg, lg_ref, rtol=1e-5, atol=1e-5)
  assert aux["mlp_probs"].shape == (4, 2, 7) and aux["att_o_usage"].shape == (4, 3, 3)
  for a, b in zip(jax.tree.leaves(aux), jax.tree.leaves(aux_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    if "scale" not in jax.tree_util.keystr(path) and "bias" not in jax.tree_util.keystr(path):
      assert np.abs(np.asarray(a)).max() > 0, jax.tree_util.keystr(path)


def test_switchhead_cache_decoding_equals_full_forward():
  cfg = moeut_cfg(**{"model.moe.dispatch": "loop"})  # decoding: 8-row blocks, most experts idle
  model = Transformer(cfg.model, nnx.Rngs(2))
  graphdef, state = nnx.split(model)
  toks = tokens(3)
  full = jit_call(model, toks)[0]

  @jax.jit
  def run(s, chunk, cache, index):
    logits, cache, _ = nnx.merge(graphdef, s)(chunk, cache=cache, cache_index=index)
    return logits, cache

  cache = model.init_cache(2, 7)
  assert cache[0]["v"].shape == (4, 2, 7, 3, 14)
  outs = []
  logits, cache = run(state, toks[:, :3], cache, jnp.int32(0))
  outs.append(logits)
  for i in range(3, 7):
    logits, cache = run(state, toks[:, i:i + 1], cache, jnp.int32(i))
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)


def test_active_matmul_params_of_the_tiny_preset():
  """Per block: q, k 2*64*64; routers 2*64*(2*4) + 64*8; V, O 2*2*4*64*32 at 2/4; experts 2*8*64*16 at 2/8."""
  cfg = _load_preset("moeut", "size=tiny")
  abstract = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0)))
  per_block = 8192 + 1024 + 512 + 32768 // 2 + 16384 // 4
  assert moeut_block.active_matmul_params(abstract.stages[0].blocks, cfg.model) == 2 * per_block


def test_norm_styles_and_single_attention_expert():
  toks = tokens(4)
  peri = jit_call(Transformer(moeut_cfg().model, nnx.Rngs(0)), toks)[0]
  pre = jit_call(Transformer(moeut_cfg(**{"model.moe.norm_style": "pre"}).model, nnx.Rngs(0)), toks)[0]
  assert np.isfinite(pre).all() and not np.allclose(peri, pre)
  one = Transformer(moeut_cfg(**{"model.moe.att_experts": 1, "model.moe.att_top_k": 1}).model, nnx.Rngs(0))
  logits, _, aux = jit_call(one, toks)
  assert np.isfinite(logits).all() and "att_v_probs" not in aux and "mlp_probs" in aux
  assert one.stages[0].blocks.attn.sel_v is None


def test_bfloat16_compute_runs_and_tracks_float32():
  cfg32 = moeut_cfg(**{"model.moe.dispatch": "loop"})
  cfg16 = moeut_cfg(**{"model.moe.dispatch": "loop", "model.compute_dtype": "bfloat16"})
  toks = tokens(5)
  m32, m16 = Transformer(cfg32.model, nnx.Rngs(0)), Transformer(cfg16.model, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(m16, nnx.Param, ...)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(toks)[0])))(params)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))
  # bf16 rounding may flip a near-tie in a top-k choice, so compare on average.
  diff = np.abs(np.asarray(jit_call(m16, toks)[0], np.float32) - np.asarray(jit_call(m32, toks)[0]))
  assert diff.mean() < 0.03 and diff.max() < 0.5, (diff.mean(), diff.max())


@pytest.mark.devices(8)
def test_data_parallel_dispatch_under_a_mesh_matches_plain():
  """Batch over an 8-device `data` axis: each shard routes its own tokens;
  outputs and the psum-ed usage equal the single-program result."""
  layer = sigma_moe()
  x = rand((8, 3, D), 6)
  y, aux = jit_call(layer, x)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh), nnx.logical_axis_rules([("batch", "data")]):
    assert sharding.batch_axes() == (("data",), 8)
    y_dp, aux_dp = jit_call(layer, x)
  np.testing.assert_allclose(y_dp, y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux_dp["mlp_usage"], aux["mlp_usage"], rtol=1e-6)
  np.testing.assert_allclose(aux_dp["mlp_probs"], aux["mlp_probs"], rtol=1e-6)


@pytest.mark.devices(8)
def test_model_on_a_data_fsdp_expert_mesh_matches_single_device():
  """8 devices as data 2 x fsdp 2 x expert 2 with experts sharded over `expert`: created in place
  by sharding.create_sharded, run under its mesh and rules."""
  from recursive_lm import sharding
  cfg = moeut_cfg(**{"model.moe.dispatch": "loop", "model.moe.experts": 8, "model.moe.att_experts": 4,
                     "mesh.rules": "fsdp_tensor_expert", "mesh.data": 2, "mesh.fsdp": 2, "mesh.expert": 2})
  toks = tokens(0, b=8)
  ref = jit_call(Transformer(cfg.model, nnx.Rngs(0)), toks)[0]
  mesh = sharding.make_mesh(cfg.mesh)
  model = sharding.create_sharded(lambda: Transformer(cfg.model, nnx.Rngs(0)), mesh, cfg.mesh.rules)
  assert model.stages[0].blocks.mlp.keys[...].sharding.spec[1] == "expert"  # [K, E, D, S]
  graphdef, state = nnx.split(model)
  run = sharding.under_mesh(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]), mesh, cfg.mesh.rules)
  out = run(state, jax.device_put(toks, sharding.batch_sharding(mesh, cfg.mesh.rules)))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("overrides,match", [
    ({"model.moe.top_k": 8}, r"model\.moe\.top_k=8"),
    ({"model.moe.att_top_k": 4}, r"model\.moe\.att_top_k=4"),
    ({"model.moe.experts": 0}, r"model\.moe\.experts=0"),
    ({"model.moe.norm_style": "post"}, r"model\.moe\.norm_style"),
    ({"model.moe.dispatch": "magic"}, r"model\.moe\.dispatch"),
    ({"model.num_kv_heads": 1}, r"model\.num_kv_heads=1"),
    ({"lora_rank": 2}, r"model\.lora targets \['down', 'gate', 'o', 'up', 'v'\]"),
    ({"mesh.rules": "fsdp_tensor_expert", "mesh.expert": 2}, r"model\.moe\.experts=7 is not divisible by mesh\.expert=2"),
    ({"model.block": "sparse"}, r"model\.block"),
])
def test_config_rejects(overrides, match):
  with pytest.raises(ConfigError, match=match):
    moeut_cfg(**overrides)


def test_config_accepts_qk_lora_and_round_trips_json():
  cfg = moeut_cfg(**{"lora_rank": 2, "model.lora.targets": "q,k"})
  assert cfg.model.lora.ranks == (("k", 2), ("q", 2))
  assert config_lib.from_json(cfg.to_json()) == cfg
  jit_call(Transformer(cfg.model, nnx.Rngs(0)), tokens())  # per-depth q/k adapters on the MoEUT block


def _load_preset(name, arg):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return config_lib.load(mod.get_config(arg))


def _count(cfg) -> int:
  abstract = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


PAPER_DENSE = {"44m": 44.54e6, "126m": 125.65e6, "244m": 243.57e6}
PINNED = {("moeut", "tiny"): 151_168, ("moeut", "44m"): 44_337_792, ("moeut", "126m"): 125_661_696,
          ("moeut", "244m"): 243_318_784, ("moeut_dense", "tiny"): 151_168, ("moeut_dense", "44m"): 44_496_824,
          ("moeut_dense", "126m"): 125_584_896, ("moeut_dense", "244m"): 243_468_288}


@pytest.mark.parametrize("name,size", sorted(PINNED))
def test_preset_parameter_counts(name, size):
  """eval_shape only: no weights are allocated. Within 1% of the paper's dense baselines."""
  n = _count(_load_preset(name, f"size={size}"))
  assert n == PINNED[name, size]
  if size in PAPER_DENSE:
    assert abs(n / PAPER_DENSE[size] - 1) < 0.01
