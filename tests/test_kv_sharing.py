"""KV sharing (model.kv_sharing): the default is today's model bit for bit;
CLA and MLKV equal a hand-written forward; decoding with the shared cache
equals the full forward in every mode; the cache holds one entry per slot."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm.model.layers import apply_rope, rope_tables
from recursive_lm.model.transformer import Transformer

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "logits_before_kv_sharing.npz")

# The configs whose logits were recorded before KV sharing existed (same recipe as below).
RECORDED = {
    "relaxed_windows": dict(preset="cycle", num_layers=6, repeats=2, lora_rank=2, **{
        "model.sliding_window": 3, "model.global_every": 3, "model.rope_base_local": 500.0, "model.qk_norm": True}),
    "middle_sequence_norms": dict(preset="middle_sequence", num_layers=6, repeats=2, per_depth_norms=True),
}


def perturbed(cfg, seed=3):
  """The model with every parameter moved off its init (LoRA B is zero at init)."""
  model = Transformer(cfg.model, nnx.Rngs(seed))
  leaves, tdef = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(7), len(leaves))
  nnx.update(model, jax.tree.unflatten(tdef, [l + 0.05 * jax.random.normal(k, l.shape, l.dtype)
                                              for l, k in zip(leaves, keys)]))
  return model


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="logits recorded on XLA:CPU")
@pytest.mark.parametrize("name", list(RECORDED))
def test_default_equals_the_recorded_logits(name):
  ref = np.load(REFERENCE)
  tokens = jnp.asarray(ref["tokens"])
  cfg = config_lib.load(tiny_config(**RECORDED[name]))
  assert cfg.model.kv_sharing == "none"
  model = perturbed(cfg)
  # Recorded on another machine's XLA:CPU: its vector width changes the float32 rounding of a
  # reduction (seen: 2e-6 apart on a fresh install of the pinned packages), so float noise is allowed.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  close(np.asarray(model(tokens)[0]), ref[name])
  cache = model.init_cache(2, 16)
  a, cache, _ = model(tokens[:, :7], cache=cache, cache_index=jnp.int32(0))
  b, cache, _ = model(tokens[:, 7:], cache=cache, cache_index=jnp.int32(7))
  close(np.concatenate([np.asarray(a), np.asarray(b)], 1), ref[name + "_cached"])


def hand_written(model, tokens, sources):
  """The vanilla plan's forward written out: layer l attends to the K/V that
  layer sources[l] computed (plain softmax, explicit causal mask)."""
  cfg = model.cfg
  stage = model.stages[0]
  take = lambda mod, i: nnx.merge(nnx.graphdef(mod), jax.tree.map(lambda a: a[i], nnx.state(mod)))
  b, t = tokens.shape
  h_n, kv_n, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  cos, sin = rope_tables(jnp.arange(t), hd, cfg.rope_base)
  causal = jnp.tril(jnp.ones((t, t), bool))
  x = model.embed(tokens, jnp.float32)
  kv = {}
  for l, src in enumerate(sources):
    blk = take(stage.blocks, l)
    h = blk.attn_norm(x)
    q = apply_rope((h @ blk.attn.q.kernel[...]).reshape(b, t, h_n, hd), cos, sin)
    if src == l:
      w = take(stage.kv, stage.kv_blocks.index(l))
      kv[l] = (apply_rope((h @ w.k.kernel[...]).reshape(b, t, kv_n, hd), cos, sin),
               (h @ w.v.kernel[...]).reshape(b, t, kv_n, hd))
    k, v = (jnp.repeat(a, h_n // kv_n, axis=2) for a in kv[src])
    s = jnp.einsum("bthd,bshd->bhts", q, k) * hd**-0.5
    p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
    x = x + jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, h_n * hd) @ blk.attn.o.kernel[...]
    x = x + blk.mlp(blk.mlp_norm(x), {})
  return model.readout(x)


@pytest.mark.parametrize("sharing,layers,sources", [
    ("cla:2", 4, [0, 0, 2, 2]),
    ("mlkv:2", 5, [0, 0, 2, 2, 2]),  # KV layers 0 and 5 // 2
    ("mlkv:1", 3, [0, 0, 0]),
])
def test_cross_layer_sharing_equals_hand_written(sharing, layers, sources):
  cfg = config_lib.load(tiny_config(num_layers=layers, **{"model.kv_sharing": sharing, "model.num_kv_heads": 3}))
  model = perturbed(cfg)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 9)), jnp.int32)
  np.testing.assert_allclose(model(tokens)[0], hand_written(model, tokens, sources), atol=2e-5, rtol=2e-5)
  # Readers own no K/V projections: only the writing blocks have them.
  assert model.stages[0].kv_blocks == tuple(sorted(set(sources)))
  assert model.stages[0].blocks.attn.k is None


def _adapted(x, kernel, lora):
  """x @ W, plus the LoRA update s * (x @ A) @ B when the layer has one."""
  y = x @ kernel[...]
  return y if lora is None else y + lora.scale * (x @ lora.a[...]) @ lora.b[...]


def hand_written_relaxed(model, tokens, sources):
  """`hand_written` for a one-stage tied plan with per-depth LoRA: layer l runs
  its unique block with its own q/o/MLP adapters; a layer that writes K/V uses
  the K/V projections of its block and its own k/v adapters."""
  cfg, stage = model.cfg, model.stages[0]
  take = lambda mod, i: nnx.merge(nnx.graphdef(mod), jax.tree.map(lambda a: a[i], nnx.state(mod)))
  b, t = tokens.shape
  h_n, kv_n, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  cos, sin = rope_tables(jnp.arange(t), hd, cfg.rope_base)
  causal = jnp.tril(jnp.ones((t, t), bool))
  x = model.embed(tokens, jnp.float32)
  kv = {}
  for layer, src in zip(model.plan.layers(), sources):
    l, blk = layer.depth, take(stage.blocks, layer.block)
    ad = dict(take(stage.slots, l).lora)
    h = blk.attn_norm(x)
    q = apply_rope(_adapted(h, blk.attn.q.kernel, ad.get("q")).reshape(b, t, h_n, hd), cos, sin)
    if src == l:
      w = take(stage.kv, stage.kv_blocks.index(layer.block))
      kv_ad = dict(take(stage.kv_lora, stage.kv_depths.index(l)).lora)
      kv[l] = (apply_rope(_adapted(h, w.k.kernel, kv_ad["k"]).reshape(b, t, kv_n, hd), cos, sin),
               _adapted(h, w.v.kernel, kv_ad["v"]).reshape(b, t, kv_n, hd))
    k, v = (jnp.repeat(a, h_n // kv_n, axis=2) for a in kv[src])
    s = jnp.einsum("bthd,bshd->bhts", q, k) * hd**-0.5
    p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
    x = x + _adapted(jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, h_n * hd), blk.attn.o.kernel, ad.get("o"))
    x = x + blk.mlp(blk.mlp_norm(x), ad)
  return model.readout(x)


def test_readers_own_no_kv_projection_and_no_kv_adapter():
  """Tied 1-2-1-2 plan, per-depth LoRA, cla:2: depths 0 and 2 (block 0) write
  K/V, depths 1 and 3 (block 1) read them. Block 1 has no K/V projection, the
  reading depths no k/v adapters; the forward equals the hand-written one."""
  from recursive_lm.analysis import probes
  cfg = config_lib.load(tiny_config(preset="cycle", num_layers=4, repeats=2, lora_rank=2,
                                    **{"model.kv_sharing": "cla:2", "model.num_kv_heads": 3}))
  model = perturbed(cfg)  # LoRA B moved off zero: every adapter changes the output
  stage = model.stages[0]
  assert [(l.block, l.kv_write) for l in model.plan.layers()] == [(0, True), (1, False), (0, True), (1, False)]
  assert stage.kv_blocks == (0,) and stage.kv_depths == (0, 2)
  assert set(stage.slots.lora) == {"q", "o", "gate", "up", "down"}
  assert set(stage.kv_lora.lora) == {"k", "v"} and stage.kv_lora.lora["k"].a.shape == (2, 42, 2)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 61, (2, 9)), jnp.int32)
  np.testing.assert_allclose(model(tokens)[0], hand_written_relaxed(model, tokens, [0, 0, 2, 2]),
                             atol=2e-5, rtol=2e-5)
  spectra = probes.lora_spectra(model)
  (k_key,) = [key for key in spectra if key.endswith("/k")]
  assert list(spectra[k_key]["depths"]) == [0, 2] and spectra[k_key]["relative_norm"].shape == (2,)
  assert len(spectra) == len(cfg.model.lora.ranks)


def test_reader_parameters_and_flops_drop_by_the_hand_count():
  """cla:2 on the tied 1-2-1-2 plan with rank-2 LoRA, against no sharing: one
  block's K/V projections and two depths' k/v adapters are gone (stored), and
  two layers no longer run either (FLOPs); the real model stores what
  `describe` says."""
  from recursive_lm.analysis import accounting
  c = tiny_config(preset="cycle", num_layers=4, repeats=2, lora_rank=2)
  d, models = {}, {}
  for sharing in ("none", "cla:2"):
    c.model.kv_sharing = sharing
    cfg = config_lib.load(c)
    d[sharing] = accounting.describe(cfg)
    models[sharing] = Transformer(cfg.model, nnx.Rngs(0))
    stored = sum(a.size for a in jax.tree.leaves(nnx.state(models[sharing], nnx.Param)))
    assert stored == d[sharing]["total_params"]
  dim, kv_dim, rank = 42, 1 * 14, 2  # D, Kv * Hd (tiny_config: 1 kv head of 14), LoRA rank
  kv_proj = 2 * dim * kv_dim  # K and V kernels of one block
  kv_lora = 2 * rank * (dim + kv_dim)  # k and v adapters of one depth: A [D, r], B [r, Kv*Hd]
  none, cla = d["none"], d["cla:2"]
  assert none["unique_params"] - cla["unique_params"] == kv_proj
  assert none["lora_params"] - cla["lora_params"] == 2 * kv_lora
  assert none["total_params"] - cla["total_params"] == kv_proj + 2 * kv_lora
  assert none["flops_per_token"] - cla["flops_per_token"] == 6 * 2 * (kv_proj + kv_lora)


MODES = [("none", "cycle"), ("cla:2", "cycle"), ("mlkv:2", "cycle"), ("mlkv:3", "cycle"), ("recursion", "cycle"),
         ("recursion", "sequence"), ("recursion", "middle_cycle"), ("cla:2", "middle_cycle")]


@pytest.mark.parametrize("sharing,preset", MODES, ids=str)
def test_decoding_with_the_cache_equals_the_full_forward(sharing, preset):
  """Prefill, then one token at a time through the shared cache, against one
  cache-free forward; a tied plan with per-depth LoRA and sliding windows."""
  cfg = config_lib.load(tiny_config(preset=preset, num_layers=6 if preset == "middle_cycle" else 4, repeats=2,
                                    lora_rank=2, **{"model.kv_sharing": sharing, "model.sliding_window": 3}))
  model = perturbed(cfg)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 61, (2, 10)), jnp.int32)
  full = model(tokens)[0]
  cache = model.init_cache(2, 16)
  out, cache, _ = model(tokens[:, :4], cache=cache, cache_index=jnp.int32(0))
  outs = [out]
  for i in range(4, 10):
    out, cache, _ = model(tokens[:, i:i + 1], cache=cache, cache_index=jnp.int32(i))
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)
  # One cache entry per distinct KV slot.
  n_entries = sum(c["k"].shape[0] for c in cache)
  assert n_entries == model.plan.kv_slots == len({l.kv_slot for l in model.plan.layers()})


def test_cache_bytes_and_params_follow_the_slots():
  from recursive_lm.analysis import accounting
  base = tiny_config(num_layers=4)
  per_slot = 2 * 1 * 14 * 4  # k and v: Kv=1 heads of Hd=14, float32, per token
  d = {}
  for sharing in ("none", "cla:2", "mlkv:1"):
    base.model.kv_sharing = sharing
    cfg = config_lib.load(base)
    d[sharing] = accounting.describe(cfg)
    model = Transformer(cfg.model, nnx.Rngs(0))
    cache = model.init_cache(3, 5)
    cache_bytes = sum(a.nbytes for c in cache for a in c.values())
    assert d[sharing]["kv_cache_bytes_per_token"] == cache_bytes // (3 * 5) == d[sharing]["kv_slots"] * per_slot
    assert [p["kv_slot"] for p in d[sharing]["plan"]] == [l.kv_slot for l in model.plan.layers()]
  assert [d[s]["kv_slots"] for s in ("none", "cla:2", "mlkv:1")] == [4, 2, 1]
  kv_params = 2 * 42 * 14  # one layer's K and V projections [D, Kv * Hd]
  assert d["none"]["unique_params"] - d["cla:2"]["unique_params"] == 2 * kv_params
  assert d["none"]["unique_params"] - d["mlkv:1"]["unique_params"] == 3 * kv_params
  # Training FLOPs: 6 per weight per token for every K/V projection that no longer runs.
  assert d["none"]["flops_per_token"] - d["cla:2"]["flops_per_token"] == 6 * 2 * kv_params


def test_recursion_sharing_skips_kv_of_later_repeats_in_the_flop_count():
  from recursive_lm.analysis import accounting
  c = tiny_config(preset="cycle", num_layers=4, repeats=2, lora_rank=2)
  none = accounting.describe(config_lib.load(c))
  c.model.kv_sharing = "recursion"
  rec = accounting.describe(config_lib.load(c))
  assert rec["unique_params"] == none["unique_params"]  # every block writes at its first repeat
  assert rec["kv_slots"] == 2 and none["kv_slots"] == 4
  kv_params = 2 * 42 * 14
  kv_lora = 2 * (2 * (42 + 14))  # the k and v adapters of one depth: A [D, r] and B [r, Kv*Hd]
  assert none["flops_per_token"] - rec["flops_per_token"] == 6 * 2 * (kv_params + kv_lora)


def test_shared_kv_trains():
  """Gradients reach the K/V projections through the layers that read them."""
  import optax
  cfg = config_lib.load(tiny_config(num_layers=4, **{"model.kv_sharing": "cla:2"}))
  model = perturbed(cfg)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 61, (2, 8)), jnp.int32)

  def loss(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(tokens[:, :-1])[0], tokens[:, 1:]).mean()

  grads = nnx.grad(loss)(model)
  g = grads.stages[0].kv.k.kernel[...]
  assert g.shape == (2, 42, 14) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).min(axis=(1, 2)).max()) > 0


@pytest.mark.parametrize("sharing", ["cla:2", "recursion"])
def test_probes_walk_the_shared_store(sharing):
  """The per-layer walk of the probes reproduces the model's logits and its
  per-depth aux under KV sharing too."""
  from recursive_lm.analysis import probes
  cfg = config_lib.load(tiny_config(preset="cycle", num_layers=4, repeats=2, lora_rank=2,
                                    **{"model.kv_sharing": sharing}))
  model = perturbed(cfg)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 61, (2, 6)), jnp.int32)
  hidden, aux = probes.residual_stream(model, tokens)
  logits, _, model_aux = model(tokens)
  assert hidden.shape[0] == 5
  np.testing.assert_allclose(probes.readout(model, hidden[-1]), logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(aux["resid_rms"], model_aux["resid_rms"], atol=1e-6, rtol=1e-6)
