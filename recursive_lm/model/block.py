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
from recursive_lm.model.attention import Attention, Context
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


def _norm(cfg: ModelConfig) -> Norm:
  return Norm(cfg.d_model, cfg.norm, cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))


class DepthSlot(nnx.Module):
  """Per-effective-layer parameters: {target: LoRA} and optional norms."""

  def __init__(self, cfg: ModelConfig, with_norms: bool, rngs: nnx.Rngs):
    shapes, pd = lora_shapes(cfg), jnp.dtype(cfg.param_dtype)
    self.lora = nnx.Dict({t: LoRA(*shapes[t][:2], r, cfg.lora.scale_of(t), *shapes[t][2:], rngs, pd)
                          for t, r in cfg.lora.ranks})
    self.attn_norm = _norm(cfg) if with_norms else None
    self.mlp_norm = _norm(cfg) if with_norms else None

  @staticmethod
  def needed(cfg: ModelConfig, with_norms: bool) -> bool:
    return bool(cfg.lora.ranks) or with_norms


class Block(nnx.Module):
  """x -> x + attn(norm(x)); x -> x + mlp(norm(x)).

  `own_norms=False` leaves the norms to the depth slot (per-depth norms).
  """

  def __init__(self, cfg: ModelConfig, own_norms: bool, total_depth: int, rngs: nnx.Rngs):
    # Output projections start smaller so the residual stream's variance stays
    # about constant with depth (GPT-2 style 1/sqrt(2 L) on top of fan-in).
    out_std = (cfg.num_heads * cfg.head_dim) ** -0.5 / (2 * total_depth) ** 0.5
    self.attn_norm = _norm(cfg) if own_norms else None
    self.attn = Attention(cfg, out_std, rngs)
    self.mlp_norm = _norm(cfg) if own_norms else None
    self.mlp = MLP(cfg, cfg.mlp_dim**-0.5 / (2 * total_depth) ** 0.5, rngs)

  def __call__(self, x: jax.Array, slot: DepthSlot | None, ctx: Context, cache: dict | None):
    """x [B, T, D] -> (x [B, T, D], cache, aux {name: scalar})."""
    lora = {} if slot is None else dict(slot.lora)
    attn_norm = self.attn_norm if self.attn_norm is not None else slot.attn_norm
    mlp_norm = self.mlp_norm if self.mlp_norm is not None else slot.mlp_norm
    h, cache = self.attn(attn_norm(x), ctx, lora, cache)
    x = x + h
    x = x + self.mlp(mlp_norm(x), lora)
    # Per-depth diagnostic: RMS of the residual stream after this layer.
    rms = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))
    return x, cache, {"resid_rms": rms}
