"""Ordinary transformer parts: norms, dense projections, embedding, rotary.

None of these knows about tying. Parameters carry logical axis names from
`recursive_lm.axes`; the variable types below let optimisers and counters
tell norms and adapters apart from ordinary weights by type, not by path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from recursive_lm import axes, sharding
from recursive_lm.model import native


class NormParam(nnx.Param):
  """Scale/bias of a normalisation layer (no weight decay)."""


class LoRAParam(nnx.Param):
  """A low-rank adapter factor (frozen, counted and exported on its own)."""


def normal(std: float):
  return nnx.initializers.normal(stddev=std)


class Norm(nnx.Module):
  """RMSNorm or LayerNorm over the last axis, computed in float32.

  x: [..., D] -> [..., D] in x's dtype. `offset=1` stores the scale as w with
  the effective scale 1 + w (the Gemma convention), so converted checkpoints
  load without rewriting.
  """

  def __init__(self, dim: int, kind: str = "rms", eps: float = 1e-6, offset: float = 0.0,
               param_dtype=jnp.float32, axis: str = axes.EMBED):
    self.kind, self.eps, self.offset = kind, eps, offset
    self.scale = NormParam(jnp.full((dim,), 1.0 - offset, param_dtype), out_sharding=(axis,))
    self.bias = NormParam(jnp.zeros((dim,), param_dtype), out_sharding=(axis,)) if kind == "layer" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    if self.kind == "layer":
      h = h - h.mean(-1, keepdims=True)
    h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.eps)
    h = h * (self.scale[...].astype(jnp.float32) + self.offset)
    if self.bias is not None:
      h = h + self.bias[...].astype(jnp.float32)
    return h.astype(x.dtype)


class LoRA(nnx.Module):
  """Low-rank update s * (x @ A) @ B for one projection.

  A: [d_in, R], B: [R, d_out]. B starts at zero so the adapted projection
  equals the shared one at initialisation.
  """

  def __init__(self, d_in: int, d_out: int, rank: int, scale: float, in_axis: str, out_axis: str,
               rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.scale = scale
    self.a = LoRAParam(normal(d_in**-0.5)(rngs.params(), (d_in, rank), param_dtype),
                       out_sharding=(in_axis, axes.LORA_RANK))
    self.b = LoRAParam(jnp.zeros((rank, d_out), param_dtype), out_sharding=(axes.LORA_RANK, out_axis))

  def __call__(self, x: jax.Array) -> jax.Array:
    return (x @ self.a[...].astype(x.dtype)) @ (self.b[...].astype(x.dtype) * self.scale)


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., d_in] @ w [d_in, d_out] -> [..., d_out], with a hand-written backward.

  Same values and gradients as `x @ w`. The backward spells out the weight
  gradient as one token-contracting matmul and transposes the narrower of
  (x, dy); XLA:CPU's autodiff lowering instead transposes the wide MLP
  activation for every weight gradient, which measured about 1.5x slower for a
  gated MLP's forward and backward at d 512 / F 1376.
  """
  return x @ w


def _linear_fwd(x, w):
  return x @ w, (x, w)


def _linear_bwd(res, dy):
  x, w = res
  dx = dy @ w.T
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dw = (dy2.T @ x2).T if x2.shape[1] >= dy2.shape[1] else x2.T @ dy2
  return dx, dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


class Dense(nnx.Module):
  """y = x @ W (+ LoRA(x) when the caller passes this depth's adapter).

  W: [d_in, d_out] with logical axes (in_axis, out_axis); no bias. matmul:
  the (x, W) -> x @ W kernel (`recursive_lm.model.kernels.dense_kernel`;
  default the custom-VJP `linear`).
  """

  def __init__(self, d_in: int, d_out: int, in_axis: str, out_axis: str, std: float, rngs: nnx.Rngs,
               param_dtype=jnp.float32, matmul=linear):
    self.matmul = matmul
    self.kernel = nnx.Param(normal(std)(rngs.params(), (d_in, d_out), param_dtype), out_sharding=(in_axis, out_axis))

  def __call__(self, x: jax.Array, lora: LoRA | None = None) -> jax.Array:
    y = self.matmul(x, self.kernel[...].astype(x.dtype))
    return y if lora is None else y + lora(x)


class Embed(nnx.Module):
  """Token embedding [V, D]; `attend` gives tied-output logits [..., V].

  `scale` multiplies the looked-up rows (Gemma: sqrt(D), in the compute
  dtype); `attend` always uses the unscaled table.
  """

  def __init__(self, vocab: int, dim: int, std: float, rngs: nnx.Rngs, param_dtype=jnp.float32,
               scale: float = 1.0):
    self.scale = scale
    self.readout = nnx.data(None)  # a decode copy's packed table^T (`layer_weights.packed_copy`)
    self.table = nnx.Param(normal(std)(rngs.params(), (vocab, dim), param_dtype), out_sharding=(axes.VOCAB, axes.EMBED))

  def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
    # Gather the fsdp-split D axis before the lookup (the FSDP weight gather);
    # a lookup into a D-split table yields D-split rows that XLA can only
    # re-shard by batch with a full copy.
    table = sharding.constrain(self.table[...], (axes.VOCAB, None))
    x = jnp.take(table, tokens, axis=0).astype(dtype)
    return x if self.scale == 1.0 else x * jnp.asarray(self.scale, dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> logits [..., V] against the unscaled table.

    A single row (a decode step at batch 1) is computed as table @ x: XLA:CPU
    emits x @ table^T for one row as a loop fusion that walks the table's
    transpose element by element, while table @ x is a plain matrix-vector
    product reading the table's rows in place. On Gemma 3 270M (a 262,144 x 640
    table) this took a batch-1 decode step from 62 to about 53 ms. More rows
    are a matrix product either way, and x @ table^T keeps the logits' layout.
    A packed copy reads its packed table through the native kernel.
    """
    if self.readout is not None:
      return native.packed_matmul(x, self.readout[...], self.table.shape[0])
    table = self.table[...].astype(x.dtype)
    if math.prod(x.shape[:-1]) == 1:
      return jax.lax.dot_general(table, x.reshape(-1), (((1,), (0,)), ((), ()))).reshape(*x.shape[:-1], -1)
    return x @ table.T


def rope_tables(positions: jax.Array, rot_dims: int, base: float | jax.Array,
                scaling: tuple | None = None) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [..., T, rot_dims // 2] for integer positions [..., T]
  ([T], or [B, T] when rows sit at different positions).

  scaling: None, ("linear", factor) (positions / factor) or ("llama3", factor,
  low_freq_factor, high_freq_factor, original_max_len) (Llama 3.1: long
  wavelengths divided by factor, short ones kept, a smooth blend between).
  """
  inv_freq = 1.0 / (base ** (jnp.arange(0, rot_dims, 2, dtype=jnp.float32) / rot_dims))
  if scaling is not None:
    inv_freq = scaled_inv_freq(inv_freq, scaling)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def scaled_inv_freq(inv_freq: jax.Array, scaling: tuple) -> jax.Array:
  """Rotary frequencies [rot/2] under a context-extension rule (see rope_tables)."""
  kind, factor = scaling[0], scaling[1]
  if kind == "linear":
    return inv_freq / factor
  if kind != "llama3":
    raise ValueError(f"unknown rope scaling {kind!r}")
  low, high, original = scaling[2], scaling[3], scaling[4]
  wavelen = 2 * jnp.pi / inv_freq
  # Wavelengths longer than original / low are slowed by `factor`, shorter than
  # original / high kept; in between, a linear blend in original / wavelen.
  smooth = (original / wavelen - low) / (high - low)
  blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  out = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
  medium = (wavelen >= original / high) & (wavelen <= original / low)
  return jnp.where(medium, blended, out)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate the first 2 * cos.shape[-1] dims of x [B, T, N, Hd] (half-split pairs
  i, i + r/2); cos, sin: [T, r/2] (all rows at the same positions) or [B, T, r/2]."""
  r = 2 * cos.shape[-1]
  rot, rest = x[..., :r].astype(jnp.float32), x[..., r:]
  x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
  c, s = cos[..., None, :], sin[..., None, :]  # [(B,) T, 1, r/2]: broadcast over heads
  out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
  return out if rest.shape[-1] == 0 else jnp.concatenate([out, rest], axis=-1)
