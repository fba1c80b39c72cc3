"""One pre-norm transformer block, and the per-depth slot that relaxes it.

`Block` holds the weights that may be shared across depth. `DepthSlot` holds
what each effective layer owns on its own: LoRA adapters for the chosen
projections and, for stages with per-depth norms, the norms. The recursion
code stacks slots along a leading depth axis and hands the block one slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recursive_lm import axes
from recursive_lm.config import ModelConfig
from recursive_lm.model.attention import Attention, Context, KVProjection, write_cache
from recursive_lm.model.layers import LoRA, Norm
from recursive_lm.model.mlp import MLP


def lora_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, str, str]]:
  """(d_in, d_out, in_axis, out_axis) of every projection LoRA may target."""
  d, q, kv, f = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.mlp_dim
  return {
      "q": (d, q, axes.EMBED, axes.HEADS), "k": (d, kv, axes.EMBED, axes.KV_HEADS),
      "v": (d, kv, axes.EMBED, axes.KV_HEADS), "o": (q, d, axes.HEADS, axes.EMBED),
      "gate": (d, f, axes.EMBED, axes.MLP), "up": (d, f, axes.EMBED, axes.MLP), "down": (f, d, axes.MLP, axes.EMBED),
  }


def _norm(cfg: ModelConfig, dim: int | None = None) -> Norm:
  axis = axes.EMBED if dim is None else axes.HEAD_DIM
  return Norm(dim or cfg.d_model, cfg.norm, cfg.norm_eps, cfg.norm_offset, jnp.dtype(cfg.param_dtype), axis)


def _add_norms(owner: nnx.Module, cfg: ModelConfig, on: bool) -> None:
  """Give `owner` (a Block, or a DepthSlot with per-depth norms) every norm the
  architecture has; the optional ones are None when the config turns them off
  (or when `on` is False: the norms live elsewhere)."""
  owner.attn_norm = _norm(cfg) if on else None
  owner.mlp_norm = _norm(cfg) if on else None
  owner.post_attn_norm = _norm(cfg) if on and cfg.post_norms else None
  owner.post_mlp_norm = _norm(cfg) if on and cfg.post_norms else None
  owner.q_norm = _norm(cfg, cfg.head_dim) if on and cfg.qk_norm else None
  owner.k_norm = _norm(cfg, cfg.head_dim) if on and cfg.qk_norm else None


def _maybe(norm: Norm | None, x: jax.Array) -> jax.Array:
  return x if norm is None else norm(x)


KV_TARGETS = ("k", "v")


def _targets(cfg: ModelConfig, kv: bool | None) -> list[tuple[str, int]]:
  """(target, rank) of the adapters a slot holds: all (kv None), only the K/V
  ones (kv True) or all but them (kv False)."""
  return [(t, r) for t, r in cfg.lora.ranks if kv is None or (t in KV_TARGETS) == kv]


class DepthSlot(nnx.Module):
  """Per-effective-layer parameters: {target: LoRA} and optional norms.

  kv: None holds every adapter. Under KV sharing a stage's slots hold all but
  the K/V adapters (kv=False), and the K/V adapters live in slots of their own
  (kv=True), one per layer that writes a KV slot: a layer that reads K/V
  another layer wrote has no K/V projection, so no adapter of one either."""

  def __init__(self, cfg: ModelConfig, with_norms: bool, rngs: nnx.Rngs, kv: bool | None = None):
    shapes, pd = lora_shapes(cfg), jnp.dtype(cfg.param_dtype)
    self.lora = nnx.Dict({t: LoRA(*shapes[t][:2], r, cfg.lora.scale_of(t), *shapes[t][2:], rngs, pd)
                          for t, r in _targets(cfg, kv)})
    _add_norms(self, cfg, with_norms)

  @staticmethod
  def needed(cfg: ModelConfig, with_norms: bool, kv: bool | None = None) -> bool:
    return bool(_targets(cfg, kv)) or with_norms


def _adapters(slot: DepthSlot | None, kv_lora: DepthSlot | None) -> dict:
  return {**({} if slot is None else dict(slot.lora)), **({} if kv_lora is None else dict(kv_lora.lora))}


class Block(nnx.Module):
  """x -> x + attn(norm(x)); x -> x + mlp(norm(x)).

  Options chosen at build time (absent, with no parameters, when off):
  model.post_norms: x -> x + post_norm(attn(norm(x))) (likewise the MLP);
  model.qk_norm: per-head norms of q and k before rotary.
  `own_norms=False` leaves all norms to the depth slot (per-depth norms).
  """

  def __init__(self, cfg: ModelConfig, own_norms: bool, total_depth: int, rngs: nnx.Rngs, own_kv: bool = True):
    # Output projections start smaller so the residual stream's variance stays
    # about constant with depth (GPT-2 style 1/sqrt(2 L) on top of fan-in).
    out_std = (cfg.num_heads * cfg.head_dim) ** -0.5 / (2 * total_depth) ** 0.5
    _add_norms(self, cfg, own_norms)
    self.attn = Attention(cfg, out_std, rngs, own_kv)
    self.mlp = MLP(cfg, cfg.mlp_dim**-0.5 / (2 * total_depth) ** 0.5, rngs)

  def __call__(self, x: jax.Array, slot: DepthSlot | None, ctx: Context, cache: dict | None,
               kv_proj: KVProjection | None = None, shared: bool = False, kv_lora: DepthSlot | None = None):
    """x [B, T, D] -> (x [B, T, D], cache, aux {name: scalar}). kv_proj, shared:
    KV sharing (see `Attention.__call__`); kv_lora: a writing layer's K/V
    adapters under KV sharing (`DepthSlot(kv=True)`)."""
    lora = _adapters(slot, kv_lora)
    n = self if self.attn_norm is not None else slot  # where this depth's norms live
    h, cache = self.attn(n.attn_norm(x), ctx, lora, cache, n.q_norm, n.k_norm, kv_proj, shared)
    x = x + _maybe(n.post_attn_norm, h)
    x = x + _maybe(n.post_mlp_norm, self.mlp(n.mlp_norm(x), lora))
    # Per-depth diagnostic: RMS of the residual stream after this layer.
    rms = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))
    return x, cache, {"resid_rms": rms}

  def project_kv(self, x: jax.Array, slot: DepthSlot | None, ctx: Context, kv_proj: KVProjection | None = None,
                 kv_lora: DepthSlot | None = None):
    """This layer's keys/values of x [B, T, D] as the cache stores them: (k, v)
    [B, T, K, Hd], or (None, None) for a layer reading a shared KV slot."""
    lora = _adapters(slot, kv_lora)
    n = self if self.attn_norm is not None else slot
    return self.attn.project_kv(n.attn_norm(x), ctx, lora, n.k_norm, kv_proj)

  def write_kv(self, x: jax.Array, slot: DepthSlot | None, ctx: Context, cache: dict,
               kv_proj: KVProjection | None = None, kv_lora: DepthSlot | None = None) -> dict:
    """Only this layer's keys/values of x [B, T, D], written into `cache`
    {'k','v'} [B, S, K, Hd] at ctx.cache_index: the same entries `__call__`
    writes for the same x, without the attention or MLP. For tokens that
    exited before this layer (inference/exits.py). A layer reading a shared
    KV slot writes nothing: the cache comes back unchanged."""
    k, v = self.project_kv(x, slot, ctx, kv_proj, kv_lora)
    if k is None:
      return cache
    return {**cache, "k": write_cache(cache["k"], k, ctx.cache_index), "v": write_cache(cache["v"], v, ctx.cache_index)}
