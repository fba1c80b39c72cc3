"""The model against its references: scanned vs unrolled (forward and gradients),
vanilla vs a hand-written jnp transformer, relaxed-at-init vs tied, LoRA
gradients reaching every depth slot, and KV-cache decoding vs a full forward.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm.analysis import accounting
from recursive_lm.config import ConfigError
from recursive_lm.model.layers import LoRAParam, NormParam
from recursive_lm.model.transformer import Transformer

V, T, B = 61, 7, 2


def build(**overrides) -> Transformer:
  """The model as initialised by its own code (eager: ~1 s of small compiles)."""
  cfg = config_lib.load(tiny_config(**overrides))
  return Transformer(cfg.model, nnx.Rngs(0))


def build_random(seed=1, **overrides) -> Transformer:
  """The model's structure (nnx.eval_shape, no compiles) filled with numpy
  noise: every weight random, LoRA B != 0 and norm scales != 1, so a mixed-up
  block, depth slot or per-depth norm cannot hide behind init symmetries."""
  cfg = config_lib.load(tiny_config(**overrides))
  graphdef, norms, params, rest = nnx.split(accounting.abstract_model(cfg), NormParam, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  norms = jax.tree.map(lambda x: jnp.asarray(1 + 0.1 * rng.standard_normal(x.shape), x.dtype), norms)
  # Fan-in scaled; x.shape[-2] is d_in for kernels, LoRA factors and the embedding.
  params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * x.shape[-2] ** -0.5, x.dtype), params)
  return nnx.merge(graphdef, norms, params, rest)


def tokens(seed=0, t=T):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, t)), jnp.int32)


def cross_entropy(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


# One case per preset; LoRA, per-depth norms and GQA/MHA vary across them so
# that every combination that changes the stored layout is covered somewhere.
CASES = {
    "vanilla": dict(preset="vanilla", num_layers=3, **{"model.num_kv_heads": 3}),
    "looped": dict(preset="looped", num_layers=3, lora_rank=2, per_depth_norms=True),
    "cycle": dict(preset="cycle", num_layers=4, repeats=2, lora_rank=2, per_depth_norms=True),
    "sequence": dict(preset="sequence", num_layers=4, repeats=2, lora_rank=3, **{"model.lora.ranks": "down=1,q=0"}),
    "middle_cycle": dict(preset="middle_cycle", num_layers=6, repeats=2, lora_rank=2),
    "middle_sequence": dict(preset="middle_sequence", num_layers=6, repeats=2, lora_rank=2, per_depth_norms=True,
                            **{"model.num_kv_heads": 3, "model.mlp_type": "gelu", "model.norm": "layer",
                               "model.lora.targets": "q,k,v,o,up,down"}),
    "sandwich": dict(preset="sandwich", num_layers=5, lora_rank=2, per_depth_norms=True,
                     **{"model.tie_embeddings": False, "model.head_dim": 12, "model.rope_fraction": 0.5}),
    "recurrent": dict(preset="recurrent", num_layers=6, repeats=2, lora_rank=2, per_depth_norms=True,
                      **{"model.plan.prelude": 1, "model.plan.coda": 1, "model.recurrent.injection": "parcae"}),
}


def test_cases_cover_every_preset():
  assert set(CASES) == set(config_lib.PLAN_PRESETS)


def loss_fn(graphdef, rest, unrolled):
  toks, targets = tokens(0), tokens(1)

  def loss(p):
    logits, _, aux = nnx.merge(graphdef, p, rest)(toks, unrolled=unrolled)
    return cross_entropy(logits, targets) + 1e-3 * jnp.mean(logits**2), (logits, aux)

  return loss


@functools.lru_cache(maxsize=None)
def unrolled_reference(name):
  """(params, logits, grads, aux) of the unrolled Python loop; computed once
  per preset and shared by the remat cases."""
  graphdef, params, rest = nnx.split(build_random(**CASES[name]), nnx.Param, ...)
  (_, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss_fn(graphdef, rest, unrolled=True), has_aux=True))(params)
  return params, logits, grads, aux


@pytest.mark.parametrize("remat", ["none", "full", "nested"])  # full: remat each layer; nested: also each outer step
@pytest.mark.parametrize("name", list(CASES))
def test_scan_matches_unrolled(name, remat):
  """Logits and the gradient of every parameter agree between the nested-scan
  path (with the given remat) and the unrolled reference."""
  params, ref_logits, ref_grads, ref_aux = unrolled_reference(name)
  model = accounting.abstract_model(config_lib.load(tiny_config(remat=remat, **CASES[name])))
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  (_, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss_fn(graphdef, rest, unrolled=False), has_aux=True))(params)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  assert_trees_close(grads, ref_grads)
  assert aux["resid_rms"].shape == (model.plan.depth,)
  np.testing.assert_allclose(aux["resid_rms"], ref_aux["resid_rms"], rtol=1e-5)
  # Every parameter receives a gradient (random LoRA B lets A's through too).
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)


def _rms(x, scale, eps):
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _rope(x, pos, base):
  # Half-split pairs (i, i + Hd/2) over all of head_dim (rope_fraction 1).
  hd = x.shape[-1]
  inv = 1.0 / base ** (jnp.arange(0, hd, 2) / hd)
  ang = pos[:, None] * inv[None]
  c, s = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
  x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def reference_forward(p, toks, cfg):
  """A plain transformer written from the equations, reading the stacked
  weights of a vanilla plan one layer at a time."""
  h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  blocks = p["stages"][0]["blocks"]
  x = p["embed"]["table"][toks]
  t = toks.shape[1]
  pos = jnp.arange(t, dtype=jnp.float32)
  causal = jnp.tril(jnp.ones((t, t), bool))
  for i in range(cfg.plan.num_layers):
    w = jax.tree.map(lambda a: a[i], blocks)
    y = _rms(x, w["attn_norm"]["scale"], cfg.norm_eps)
    q = (y @ w["attn"]["q"]["kernel"]).reshape(B, t, h, hd)
    k = (y @ w["attn"]["k"]["kernel"]).reshape(B, t, kvh, hd)
    v = (y @ w["attn"]["v"]["kernel"]).reshape(B, t, kvh, hd)
    q, k = _rope(q, pos, cfg.rope_base), _rope(k, pos, cfg.rope_base)
    k, v = jnp.repeat(k, h // kvh, axis=2), jnp.repeat(v, h // kvh, axis=2)  # query head j uses kv head j // G
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
    a = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), -1)
    o = jnp.einsum("bhts,bshd->bthd", a, v).reshape(B, t, h * hd)
    x = x + o @ w["attn"]["o"]["kernel"]
    y = _rms(x, w["mlp_norm"]["scale"], cfg.norm_eps)
    gate = jax.nn.silu(y @ w["mlp"]["gate"]["kernel"])
    x = x + (gate * (y @ w["mlp"]["up"]["kernel"])) @ w["mlp"]["down"]["kernel"]
  x = _rms(x, p["final_norm"]["scale"], cfg.norm_eps)
  return x @ p["embed"]["table"].T


@pytest.mark.parametrize("kv_heads", [1, 3])
def test_vanilla_equals_hand_written_transformer(kv_heads):
  model = build_random(preset="vanilla", num_layers=3, **{"model.num_kv_heads": kv_heads})
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  toks = tokens(3)
  logits = nnx.merge(graphdef, params, rest)(toks)[0]
  plain = nnx.to_pure_dict(params)
  np.testing.assert_allclose(logits, reference_forward(plain, toks, model.cfg), rtol=1e-5, atol=1e-5)


def test_vanilla_gradients_equal_hand_written_transformer(monkeypatch):
  """The hand-written backwards (Dense's `linear`, the blocked attention with
  several uneven query blocks) give autodiff's gradients of the plain model."""
  from recursive_lm.model import attention
  monkeypatch.setattr(attention, "CAUSAL_BLOCK", 5)  # T = 16: blocks of 5, 5, 5, 1
  model = build_random(preset="vanilla", num_layers=2, **{"model.num_kv_heads": 1})
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  toks, targets = tokens(3), tokens(4)
  ours = jax.grad(lambda p: cross_entropy(nnx.merge(graphdef, p, rest)(toks)[0], targets))(params)
  ref = jax.grad(lambda p: cross_entropy(reference_forward(p, toks, model.cfg), targets))(nnx.to_pure_dict(params))
  assert_trees_close(nnx.to_pure_dict(ours), ref)


@pytest.mark.parametrize("preset,extra", [("cycle", dict(repeats=2)),
                                          ("middle_sequence", dict(repeats=2, per_depth_norms=True))])
def test_relaxed_at_init_equals_tied(preset, extra):
  strict = build(preset=preset, num_layers=4 if preset != "middle_sequence" else 6, lora_rank=0, **extra)
  relaxed = Transformer(config_lib.load(tiny_config(
      preset=preset, num_layers=4 if preset != "middle_sequence" else 6, lora_rank=2, **extra)).model, nnx.Rngs(7))
  shared = nnx.state(strict)
  # Copy the tied weights over; the relaxed model keeps its own LoRA (B = 0)
  # and per-depth norms (scale 1, which the strict model's norms also are).
  nnx.update(relaxed, shared)
  toks = tokens(4)
  lora = nnx.state(relaxed, LoRAParam)
  assert jax.tree.leaves(lora), "relaxed model has no adapters"
  np.testing.assert_allclose(relaxed(toks)[0], strict(toks)[0], rtol=1e-6, atol=1e-6)


def test_one_step_reaches_every_lora_slot():
  # Stages run once (no slots) around a K=2, R=2 middle in sequence order.
  model = build(preset="middle_sequence", num_layers=6, repeats=2, lora_rank=2)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optax.sgd(0.5)
  toks, targets = tokens(5), tokens(6)

  @jax.jit
  def step(p):
    g = jax.grad(lambda p: cross_entropy(nnx.merge(graphdef, p, rest)(toks)[0], targets))(p)
    updates, _ = opt.update(g, opt.init(p), p)
    return optax.apply_updates(p, updates)

  new = step(params)
  depth_stages = [s for s in model.plan.stages if s.repeats > 1]
  assert depth_stages
  for i, spec in enumerate(model.plan.stages):
    slots = new["stages"][i].get("slots")
    if spec.repeats == 1:
      assert slots is None, "a stage run once has nothing to relax"
      continue
    for target, lora in slots["lora"].items():
      b = np.asarray(lora["b"][...])
      assert b.shape[0] == spec.depth
      norms = np.linalg.norm(b.reshape(spec.depth, -1), axis=1)
      assert (norms > 0).all(), (target, norms)
      for d1 in range(spec.depth):
        for d2 in range(d1 + 1, spec.depth):
          assert not np.allclose(b[d1], b[d2]), (target, d1, d2)


@pytest.mark.parametrize("preset", ["cycle", "sequence"])
def test_kv_cache_decoding_matches_full_forward(preset):
  model = build_random(preset=preset, num_layers=6, repeats=3, lora_rank=2, per_depth_norms=True)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  toks = tokens(8)
  full = nnx.merge(graphdef, params, rest)(toks)[0]

  @jax.jit
  def run(p, chunk, cache, index):
    logits, cache, _ = nnx.merge(graphdef, p, rest)(chunk, cache=cache, cache_index=index)
    return logits, cache

  prefill = 3
  cache = model.init_cache(B, T)
  assert cache[0]["k"].shape == (model.plan.depth, B, T, 1, 14)
  logits, cache = run(params, toks[:, :prefill], cache, jnp.int32(0))
  outs = [logits]
  for i in range(prefill, T):
    logits, cache = run(params, toks[:, i:i + 1], cache, jnp.int32(i))
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_lora_rank_larger_than_projection_is_rejected():
  # k/v project 42 -> 1 kv head * 14: rank 15 cannot fit.
  with pytest.raises(ConfigError, match="rank 15.*'k'"):
    config_lib.load(tiny_config(preset="cycle", repeats=2, lora_rank=15))
  with pytest.raises(ConfigError, match="down"):
    config_lib.load(tiny_config(preset="cycle", repeats=2, lora_rank=2, **{"model.lora.ranks": "down=50"}))


def test_unknown_lora_target_is_rejected():
  with pytest.raises(ConfigError, match="model.lora.targets"):
    config_lib.load(tiny_config(preset="cycle", repeats=2, lora_rank=2, **{"model.lora.targets": "q,qkv"}))
  with pytest.raises(ConfigError):
    config_lib.load(tiny_config(lora_rank=2, **{"model.mlp_type": "gelu", "model.lora.targets": "gate"}))


def _influence_of_first_token(cfg_dict, length=12):
  """Per position: max |logit change| when token 0 is replaced."""
  model = Transformer(config_lib.load(cfg_dict).model, nnx.Rngs(0))
  toks = jax.random.randint(jax.random.key(3), (1, length), 0, 61)
  a = model(toks)[0]
  b = model(toks.at[0, 0].set((toks[0, 0] + 1) % 61))[0]
  return np.abs(np.asarray(a - b)).max(axis=(0, 2))


def test_sliding_window_limits_the_receptive_field():
  # Two local layers with window 3: token 0 reaches positions <= 2 after one layer, <= 4 after two.
  local = tiny_config(preset="cycle", num_layers=2, repeats=2, **{"model.sliding_window": 3})
  change = _influence_of_first_token(local)
  assert (change[:5] > 0).all() and (change[5:] == 0).all()
  # Every second layer global: the shared block runs once local, once global, so token 0 reaches everything.
  mixed = tiny_config(preset="cycle", num_layers=2, repeats=2,
                      **{"model.sliding_window": 3, "model.global_every": 2, "model.rope_base_local": 100.0})
  assert (_influence_of_first_token(mixed) > 0).all()


def test_windowed_layers_scan_equals_unrolled_and_kinds_follow_depth():
  cd = tiny_config(preset="sequence", num_layers=6, repeats=3, lora_rank=2,
                   **{"model.sliding_window": 4, "model.global_every": 3, "model.rope_base_local": 500.0})
  model = Transformer(config_lib.load(cd).model, nnx.Rngs(0))
  assert model.rope_bases == (10000.0, 500.0)
  assert dict(model.depth_data[0])["window"] == (4, 4, 0, 4, 4, 0)
  toks = jax.random.randint(jax.random.key(4), (2, 11), 0, 61)
  np.testing.assert_allclose(model(toks)[0], model(toks, unrolled=True)[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Architecture options of the dense block (Gemma 3 / Llama features).

GEMMA_OPTIONS = {"model.post_norms": True, "model.qk_norm": True, "model.scale_embeddings": True,
                 "model.norm_offset": 1.0, "model.query_pre_attn_scalar": 20.0, "model.mlp_type": "geglu"}


def gemma_reference_forward(p, toks, cfg):
  """Gemma 3 text written from its equations (sandwich norms, q/k norms, 1 + w
  scales, sqrt(D) embedding scale, query_pre_attn_scalar, GeGLU), vanilla plan."""
  h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  blocks = p["stages"][0]["blocks"]
  norm = lambda x, w: _rms(x, 1.0 + w, cfg.norm_eps)
  x = p["embed"]["table"][toks] * np.sqrt(cfg.d_model)
  t = toks.shape[1]
  pos = jnp.arange(t, dtype=jnp.float32)
  causal = jnp.tril(jnp.ones((t, t), bool))
  for i in range(cfg.plan.num_layers):
    w = jax.tree.map(lambda a: a[i], blocks)
    y = norm(x, w["attn_norm"]["scale"])
    q = norm((y @ w["attn"]["q"]["kernel"]).reshape(B, t, h, hd), w["q_norm"]["scale"])
    k = norm((y @ w["attn"]["k"]["kernel"]).reshape(B, t, kvh, hd), w["k_norm"]["scale"])
    v = (y @ w["attn"]["v"]["kernel"]).reshape(B, t, kvh, hd)
    q, k = _rope(q, pos, cfg.rope_base), _rope(k, pos, cfg.rope_base)
    k, v = jnp.repeat(k, h // kvh, axis=2), jnp.repeat(v, h // kvh, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) * cfg.query_pre_attn_scalar**-0.5
    a = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), -1)
    o = jnp.einsum("bhts,bshd->bthd", a, v).reshape(B, t, h * hd)
    x = x + norm(o @ w["attn"]["o"]["kernel"], w["post_attn_norm"]["scale"])
    y = norm(x, w["mlp_norm"]["scale"])
    gate = jax.nn.gelu(y @ w["mlp"]["gate"]["kernel"], approximate=True)
    x = x + norm((gate * (y @ w["mlp"]["up"]["kernel"])) @ w["mlp"]["down"]["kernel"], w["post_mlp_norm"]["scale"])
  x = norm(x, p["final_norm"]["scale"])
  return x @ p["embed"]["table"].T


def test_gemma_options_equal_hand_written_gemma():
  model = build_random(preset="vanilla", num_layers=3, **GEMMA_OPTIONS)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  plain = nnx.to_pure_dict(params)
  # Norm scales are stored as w (effective 1 + w): centre the random ones near 0.
  plain = jax.tree_util.tree_map_with_path(
      lambda path, x: x - 1.0 if "scale" in jax.tree_util.keystr(path) else x, plain)
  nnx.replace_by_pure_dict(params, plain)
  toks = tokens(9)
  logits = nnx.merge(graphdef, params, rest)(toks)[0]
  np.testing.assert_allclose(logits, gemma_reference_forward(plain, toks, model.cfg), rtol=1e-5, atol=1e-5)


def test_architecture_options_off_add_nothing_and_on_add_their_norms():
  paths = lambda m: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(m))}
  plain = accounting.abstract_model(config_lib.load(tiny_config(preset="cycle", num_layers=4, repeats=2)))
  with_all = accounting.abstract_model(config_lib.load(tiny_config(
      preset="cycle", num_layers=4, repeats=2, **{**GEMMA_OPTIONS, "model.mlp_type": "swiglu"})))
  added = paths(with_all) - paths(plain)
  assert paths(plain) <= paths(with_all)
  assert {a.split("][")[-2].strip("'") for a in added} == {"post_attn_norm", "post_mlp_norm", "q_norm", "k_norm"}
  assert nnx.state(with_all)["stages"][0]["blocks"]["q_norm"]["scale"].shape == (2, 14)  # [K, Hd]
  # Per-depth norms: every norm (q/k and post norms included) moves to the depth slots.
  per_depth = accounting.abstract_model(config_lib.load(tiny_config(
      preset="cycle", num_layers=4, repeats=2, per_depth_norms=True, **GEMMA_OPTIONS)))
  st = nnx.state(per_depth)["stages"][0]
  assert st["slots"]["q_norm"]["scale"].shape == (4, 14) and "q_norm" not in st["blocks"]
  assert st["slots"]["post_mlp_norm"]["scale"].shape == (4, 42)


def test_gemma_options_scan_matches_unrolled_with_per_depth_norms():
  model = build_random(preset="sequence", num_layers=4, repeats=2, lora_rank=2, per_depth_norms=True,
                       **{**GEMMA_OPTIONS, "model.sliding_window": 3, "model.global_every": 2,
                          "model.rope_base_local": 100.0})
  toks = tokens(10)
  np.testing.assert_allclose(model(toks)[0], model(toks, unrolled=True)[0], rtol=1e-5, atol=1e-5)


def _llama3_inv_freq_reference(inv_freq, factor, low, high, original):
  """Llama 3.1's rule, written per frequency in plain Python."""
  out = []
  for f in np.asarray(inv_freq, np.float64):
    wavelen = 2 * np.pi / f
    if wavelen < original / high:
      out.append(f)
    elif wavelen > original / low:
      out.append(f / factor)
    else:
      smooth = (original / wavelen - low) / (high - low)
      out.append((1 - smooth) * f / factor + smooth * f)
  return np.asarray(out)


def test_rope_scaling_rules():
  from recursive_lm.model.layers import rope_tables, scaled_inv_freq
  inv = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
  got = scaled_inv_freq(jnp.asarray(inv, jnp.float32), ("llama3", 8.0, 1.0, 4.0, 8192.0))
  np.testing.assert_allclose(got, _llama3_inv_freq_reference(inv, 8.0, 1.0, 4.0, 8192.0), rtol=1e-5)
  assert np.isclose(got[0], inv[0]) and np.isclose(got[-1], inv[-1] / 8)  # short kept, long slowed
  pos = jnp.arange(6)
  lin = rope_tables(pos, 8, 100.0, ("linear", 4.0))
  ref = rope_tables(pos.astype(jnp.float32) / 4.0, 8, 100.0)
  np.testing.assert_allclose(lin[0], ref[0], atol=1e-6)
  # In a model: scaling changes the global layers only, and only when on.
  cd = lambda **kw: tiny_config(preset="vanilla", num_layers=2, **kw)
  base = Transformer(config_lib.load(cd()).model, nnx.Rngs(0))
  scaled = Transformer(config_lib.load(cd(**{"model.rope_scaling": "linear", "model.rope_scaling_factor": 4.0})).model,
                       nnx.Rngs(0))
  assert base.rope_scalings == (None,) and scaled.rope_scalings == (("linear", 4.0),)
  toks = tokens(11)
  assert not np.allclose(base(toks)[0], scaled(toks)[0])
  local = Transformer(config_lib.load(cd(**{"model.rope_scaling": "llama3", "model.rope_scaling_factor": 8.0,
                                            "model.sliding_window": 3, "model.global_every": 2})).model, nnx.Rngs(0))
  assert local.rope_scalings[1] is None and local.rope_scalings[0][0] == "llama3"


@pytest.mark.parametrize("key,value,match", [
    ("model.norm_offset", 0.5, "norm_offset"),
    ("model.rope_scaling", "yarn", "rope_scaling"),
    ("model.query_pre_attn_scalar", -1.0, "query_pre_attn_scalar"),
    ("model.rope_high_freq_factor", 0.5, "rope_low_freq_factor"),
])
def test_architecture_options_are_validated(key, value, match):
  extra = {"model.rope_scaling": "llama3"} if key == "model.rope_high_freq_factor" else {}
  with pytest.raises(ConfigError, match=match):
    config_lib.load(tiny_config(**{key: value, **extra}))


def test_architecture_options_off_leave_old_configs_loading():
  import dataclasses as dc
  cfg = config_lib.load(tiny_config())
  raw = cfg.to_json()
  import json
  old = json.loads(raw)
  for f in ("post_norms", "qk_norm", "scale_embeddings", "norm_offset", "query_pre_attn_scalar", "rope_scaling",
            "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
    old["model"].pop(f)  # a config.json written before these fields existed
  assert config_lib.from_json(json.dumps(old)) == cfg
  assert dc.replace(cfg.model).post_norms is False
