"""SwitchHead attention (Csordas et al.): dense per-head Q and K, value and
output projections that are mixtures of experts per head.

Per head h, a router for V and one for O score the head's Ea experts with
sigmoids; the top-k (default 2) experts run and are weighted by their raw
scores (no renormalisation):

  v[t, h]  = sum_{e in topk_v(t,h)} s_v[t,h,e] * (x_v[t] @ V[h, e])        V: [H, Ea, D, Hd]
  out[t]   = sum_h sum_{e in topk_o(t,h)} s_o[t,h,e] * (att[t, h] @ O[h, e])   O: [H, Ea, Hd, D]

The V routers read the same (normalised) input as K and the O routers the
same as Q, as in the authors' code; x_v is the raw residual under MoEUT's
peri-layernorm. Ea = 1 is the authors' special case: a plain V projection and
a sigmoid output gate per head.

The KV cache follows `recursive_lm.model.attention`: {'k','v'} [B, S, H, Hd]
(K = H: there is no grouped-query sharing), written at ctx.cache_index. The
cached values are the per-head values after the expert mixture, so decoding
never re-runs the V experts of earlier tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from recursive_lm import axes
from recursive_lm.config import ModelConfig
from recursive_lm.model import attention as attention_lib
from recursive_lm.model import kernels
from recursive_lm.model.attention import Context
from recursive_lm.model.layers import Dense, LoRA, apply_rope
from recursive_lm.model.dispatch import grouped_linear, plan_layout, resolve_dispatch
from recursive_lm.model.moe import mean_softmax, normalised_rows, route
from recursive_lm.sharding import data_parallel


def _router_logits(x_r: jax.Array, sel: jax.Array) -> jax.Array:
  """x_r [B, T, D], sel [D, H, E] -> [B*T, H, E] float32."""
  b, t, d = x_r.shape
  return jnp.einsum("nd,dhe->nhe", x_r.reshape(b * t, d).astype(jnp.float32), sel.astype(jnp.float32))


def _assignments(logits: jax.Array, k: int):
  """Top-k per (token, head): gates [A], group ids h * E + e [A], A = N * H * k, in (token, head, j) order."""
  n, h, e = logits.shape
  gate, idx = route(logits, k)  # [N, H, k]
  group = (jnp.arange(h, dtype=jnp.int32)[None, :, None] * e + idx).reshape(-1)
  return gate, idx, group


def _counts(group: jax.Array, n_groups: int) -> jax.Array:
  # The same op as plan_layout's group sizes, so XLA computes it once.
  return jnp.zeros((n_groups,), jnp.int32).at[group.astype(jnp.int32)].add(1).astype(jnp.float32)


def _switch_v(x_r, x_v, sel, w, *, k: int, mode: str, cap: int, interpret: bool = False):
  """Values after the V-expert mixture [B, T, H, Hd], mean softmax [B, H, E], counts [H * E]."""
  b, t, d = x_v.shape
  n, (h, e, _, hd) = b * t, w.shape
  logits = _router_logits(x_r, sel)
  gate, idx, group = _assignments(logits, k)
  xf = x_v.reshape(n, d)
  if mode == "dense":
    full = jnp.zeros((n, h, e), jnp.float32).at[jnp.arange(n)[:, None, None], jnp.arange(h)[None, :, None], idx].set(gate)
    v_all = jnp.einsum("nd,hedf->nhef", xf, w.astype(xf.dtype), preferred_element_type=jnp.float32)
    v = jnp.einsum("nhef,nhe->nhf", v_all, full).astype(x_v.dtype)
  else:
    a = jnp.arange(n * h * k, dtype=jnp.int32)
    layout = plan_layout(group, h * e, mode, cap)
    v = grouped_linear(xf, w.reshape(h * e, d, hd), layout, mode, src=a // (h * k), dst=a // k,
                       gate=gate.reshape(-1), n_out=n * h, interpret=interpret)
  return v.reshape(b, t, h, hd), mean_softmax(logits, b), _counts(group, h * e)


def _switch_o(x_r, att, sel, w, *, k: int, mode: str, cap: int, interpret: bool = False):
  """att [B, T, H, Hd] -> output [B, T, D], mean softmax [B, H, E], counts [H * E]."""
  b, t, h, hd = att.shape
  n, (_, e, _, d) = b * t, w.shape
  logits = _router_logits(x_r, sel)
  gate, idx, group = _assignments(logits, k)
  if mode == "dense":
    full = jnp.zeros((n, h, e), jnp.float32).at[jnp.arange(n)[:, None, None], jnp.arange(h)[None, :, None], idx].set(gate)
    y = jnp.einsum("nhf,hefd,nhe->nd", att.reshape(n, h, hd).astype(jnp.float32), w.astype(jnp.float32), full)
    y = y.astype(att.dtype)
  else:
    a = jnp.arange(n * h * k, dtype=jnp.int32)
    layout = plan_layout(group, h * e, mode, cap)
    y = grouped_linear(att.reshape(n * h, hd), w.reshape(h * e, hd, d), layout, mode, src=a // k,
                       dst=a // (h * k), gate=gate.reshape(-1), n_out=n, interpret=interpret)
  return y.reshape(b, t, d), mean_softmax(logits, b), _counts(group, h * e)


class SwitchHead(nnx.Module):
  """(x_qk [B, T, D], x_v [B, T, D]) -> (y [B, T, D], cache, aux).

  x_qk feeds Q, K and both routers; x_v feeds the V experts. aux (when
  att_experts > 1): 'att_v_probs' / 'att_o_probs' [B, H, Ea] per-sequence mean
  softmax of each head's router logits, 'att_v_usage' / 'att_o_usage' [H, Ea]
  share of tokens that selected each expert (sums to k per head).

  Init (MoEUT, s = init_scale): Q, K, V, routers N(0, s / sqrt(D)) (router
  vectors renormalised to equal norms), O N(0, s / sqrt(H * Hd)).
  """

  def __init__(self, cfg: ModelConfig, init_scale: float, rngs: nnx.Rngs):
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
    e, pd, s = cfg.moe.att_experts, jnp.dtype(cfg.param_dtype), init_scale
    self.num_heads, self.head_dim, self.n_experts, self.top_k = h, hd, e, min(cfg.moe.att_top_k, e)
    self.dispatch, self.block_cap = cfg.moe.dispatch, cfg.moe.block_rows
    mm = kernels.dense_kernel(cfg)
    self.causal = kernels.attention_kernel(cfg)
    self.q = Dense(d, h * hd, axes.EMBED, axes.HEADS, s / d**0.5, rngs, pd, mm)
    self.k = Dense(d, h * hd, axes.EMBED, axes.KV_HEADS, s / d**0.5, rngs, pd, mm)
    self.v = nnx.Param(jax.random.normal(rngs.params(), (h, e, d, hd), pd) * (s / d**0.5),
                       out_sharding=(axes.KV_HEADS, axes.EXPERTS, axes.EMBED, axes.HEAD_DIM))
    self.o = nnx.Param(jax.random.normal(rngs.params(), (h, e, hd, d), pd) * (s / (h * hd) ** 0.5),
                       out_sharding=(axes.HEADS, axes.EXPERTS, axes.HEAD_DIM, axes.EMBED))
    self.sel_v = None if e == 1 else nnx.Param(normalised_rows(rngs.params(), (d, h, e), 0, s / d**0.5, pd),
                                               out_sharding=(axes.EMBED, axes.KV_HEADS, axes.EXPERTS))
    self.sel_o = nnx.Param(normalised_rows(rngs.params(), (d, h, e), 0, s / d**0.5, pd),
                           out_sharding=(axes.EMBED, axes.HEADS, axes.EXPERTS))

  def __call__(self, x_qk: jax.Array, x_v: jax.Array, ctx: Context, lora: dict[str, LoRA], cache: dict | None):
    b, t, _ = x_qk.shape
    h, hd = self.num_heads, self.head_dim
    q = apply_rope(self.q(x_qk, lora.get("q")).reshape(b, t, h, hd), ctx.cos, ctx.sin)
    k = apply_rope(self.k(x_qk, lora.get("k")).reshape(b, t, h, hd), ctx.cos, ctx.sin)
    mode = resolve_dispatch(self.dispatch)
    opts = dict(k=self.top_k, mode=mode, cap=self.block_cap)
    aux = {}
    if self.sel_v is None:
      v = jnp.einsum("btd,hdf->bthf", x_v, self.v[...][:, 0].astype(x_v.dtype))
    else:
      v, probs, counts = data_parallel(functools.partial(_switch_v, **opts), 2, (True, True, False))(
          x_qk, x_v, self.sel_v[...], self.v[...])
      aux.update(att_v_probs=probs, att_v_usage=counts.reshape(h, self.n_experts) / (b * t))
    att, cache = attention_lib.cached_causal_attention(q.reshape(b, t, h, 1, hd), k, v, ctx, cache,
                                                       causal=self.causal)
    att = att.reshape(b, t, h, hd)
    if self.sel_v is None:  # one expert: a sigmoid gate per head on the output
      gate = jax.nn.sigmoid(_router_logits(x_qk, self.sel_o[...])).reshape(b, t, h, 1).astype(att.dtype)
      y = jnp.einsum("bthf,hfd->btd", att * gate, self.o[...][:, 0].astype(att.dtype))
    else:
      y, probs, counts = data_parallel(functools.partial(_switch_o, **opts), 2, (True, True, False))(
          x_qk, att, self.sel_o[...], self.o[...])
      aux.update(att_o_probs=probs, att_o_usage=counts.reshape(h, self.n_experts) / (b * t))
    return y, cache, aux
