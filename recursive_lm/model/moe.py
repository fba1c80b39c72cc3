"""sigma-MoE feed-forward (Csordas et al.), its data-parallel execution, and the
MoEUT balance regulariser.

sigma-MoE: a router W_s [D, E] gives sigmoid scores per token; the top-K
experts run; their outputs are weighted by the raw sigmoid scores (no
renormalisation). Expert e is a bias-free ReLU MLP of width S (expert_size):
keys [E, D, S], values [E, S, D]. With every expert selected and a constant
score c, the layer is c x the dense ReLU MLP whose hidden layer is the
concatenation of the experts (tests/test_moe.py checks this).

Dispatch: routing yields (token, expert) assignments with a gate each; the
experts run as grouped matmuls over assignments sorted by expert, in
`recursive_lm.model.dispatch` (model.moe.dispatch: loop on CPU, blocks on GPU,
megablox on TPU, dense as the reference; the measurements are there).

Data parallelism: under an Auto mesh with logical rules (see
`recursive_lm.sharding.under_mesh`) the routing and dispatch run inside a
`shard_map` over the batch rule's mesh axes, so every device sorts and
multiplies only its own tokens (weights are gathered whole; there is no
expert-parallel all-to-all). Without a mesh the whole batch is one group.

Expert sharding: the expert axis carries the logical name `experts`. A mesh
whose `expert` axis does not divide the expert count is rejected (a
ConfigError at config load when mesh.expert is given, and from
`sharding.create_sharded`'s divisibility check otherwise): JAX has no uneven
shardings, and silently replicating the largest tensors of the model would
hide a memory blow-up.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from recursive_lm import axes, sharding
from recursive_lm.config import ConfigError
from recursive_lm.model.dispatch import expert_mlp, plan_layout, plan_tiers, resolve_dispatch


# ----------------------------------------------------------------------------
# Router statistics and data-parallel execution.


def route(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Sigmoid scores of the top-k logits along the last axis (no renormalisation) and their indices."""
  _, idx = jax.lax.top_k(logits, k)  # sigmoid is monotone: rank by logit
  return jax.nn.sigmoid(jnp.take_along_axis(logits, idx, axis=-1)), idx


def mean_softmax(logits: jax.Array, batch: int) -> jax.Array:
  """logits [N, ..., E] with N = batch * T tokens -> per-sequence mean softmax [batch, ..., E] (float32)."""
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return p.reshape((batch, -1) + p.shape[1:]).mean(1)


# ----------------------------------------------------------------------------
# The sigma-MoE layer.


def normalised_rows(key, shape, axis: int, std: float, dtype) -> jax.Array:
  """Normal(0, std) init with every router vector (the slice along `axis`) rescaled to norm
  std * sqrt(shape[axis]): equal-norm rows, about the same overall std (MoEUT's router init)."""
  w = jax.random.normal(key, shape, jnp.float32)
  w = w / jnp.linalg.norm(w, axis=axis, keepdims=True) * (std * shape[axis] ** 0.5)
  return w.astype(dtype)


def _sigma_moe(x, r_in, router, keys, values, *, top_k: int, mode: str, cap: int, interpret: bool = False):
  """x, r_in [B, T, D] -> (y [B, T, D], mean softmax [B, E], expert counts [E]). interpret: Pallas
  dispatch kernels in interpret mode (tests on CPU)."""
  b, t, d = x.shape
  e = router.shape[1]
  n = b * t
  logits = jnp.dot(r_in.reshape(n, d).astype(jnp.float32), router.astype(jnp.float32))
  gate, idx = route(logits, top_k)  # [N, K]
  xf = x.reshape(n, d)
  if mode == "dense":  # all experts for all tokens: the reference
    counts = jnp.zeros((e,), jnp.float32).at[idx.reshape(-1)].add(1.0)
    full = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], idx].set(gate)
    h = jax.nn.relu(jnp.einsum("nd,eds->nes", xf, keys.astype(x.dtype), preferred_element_type=jnp.float32))
    y = jnp.einsum("nes,esd->nd", (h * full[..., None]).astype(x.dtype), values.astype(x.dtype),
                   preferred_element_type=jnp.float32).astype(x.dtype)
  else:
    token = jnp.arange(n * top_k, dtype=jnp.int32) // top_k
    group = idx.reshape(-1)
    layout = plan_tiers(group, e, cap) if mode == "loop" else plan_layout(group, e, mode, cap)
    y = expert_mlp(xf, keys, values, layout, mode, token, gate.reshape(-1), interpret)
    counts = layout.group_sizes.astype(jnp.float32)
  return y.reshape(b, t, d), mean_softmax(logits, b), counts


class SigmaMoE(nnx.Module):
  """x [B, T, D] (experts' input) and router_input [B, T, D] -> (y [B, T, D], aux).

  aux: 'mlp_probs' [B, E] per-sequence mean of softmax(router logits) (what
  the balance loss uses: MoEUT selects with sigmoid but regularises the
  softmax), 'mlp_usage' [E] share of tokens that selected each expert (sums to K).

  Init (MoEUT): with s = init_scale, router and keys N(0, s / sqrt(D)) (router
  vectors renormalised to equal norms), values N(0, s / sqrt(E * S)).
  """

  def __init__(self, d_model: int, n_experts: int, expert_size: int, top_k: int, init_scale: float,
               rngs: nnx.Rngs, param_dtype=jnp.float32, dispatch: str = "auto", block_cap: int = 512):
    if not 1 <= top_k <= n_experts:
      raise ConfigError(f"model.moe.top_k={top_k} must be in [1, model.moe.experts={n_experts}]")
    d, e, s = d_model, n_experts, expert_size
    self.top_k, self.dispatch, self.block_cap = top_k, dispatch, block_cap
    self.router = nnx.Param(normalised_rows(rngs.params(), (d, e), 0, init_scale / d**0.5, param_dtype),
                            out_sharding=(axes.EMBED, axes.EXPERTS))
    self.keys = nnx.Param(jax.random.normal(rngs.params(), (e, d, s), param_dtype) * (init_scale / d**0.5),
                          out_sharding=(axes.EXPERTS, axes.EMBED, axes.MLP))
    self.values = nnx.Param(jax.random.normal(rngs.params(), (e, s, d), param_dtype) * (init_scale / (e * s) ** 0.5),
                            out_sharding=(axes.EXPERTS, axes.MLP, axes.EMBED))

  def __call__(self, x: jax.Array, router_input: jax.Array | None = None):
    r_in = x if router_input is None else router_input
    fn = functools.partial(_sigma_moe, top_k=self.top_k, mode=resolve_dispatch(self.dispatch), cap=self.block_cap)
    y, probs, counts = sharding.data_parallel(fn, 2, (True, True, False))(x, r_in, self.router[...], self.keys[...],
                                                                 self.values[...])
    n = x.shape[0] * x.shape[1]
    return y, {"mlp_probs": probs, "mlp_usage": counts / n}


# ----------------------------------------------------------------------------
# The balance regulariser.


def neg_entropy(p: jax.Array) -> jax.Array:
  """sum_e p log p over the last axis (0 log 0 = 0)."""
  return jnp.sum(jax.scipy.special.xlogy(p, p), axis=-1)


# aux key of the mean softmax -> (aux key of the usage, which coefficient)
_REGULARISED = {"mlp_probs": ("mlp_usage", "mlp"), "att_v_probs": ("att_v_usage", "att"),
                "att_o_probs": ("att_o_usage", "att")}


def _per_block(a: jax.Array, plan) -> list[jax.Array]:
  """[L_eff, ...] per-depth values -> per stage [U, C, ...] (unique block, repeat)."""
  return [st.per_block(x) for st, x in zip(plan.stages, plan.split(a))]


def balance_loss(aux: dict, plan, cfg) -> tuple[jax.Array, dict]:
  """MoEUT's entropy regulariser from the aux of `Transformer.__call__`.

  aux values are stacked per effective layer [L_eff, ...]. For every unique
  block of the plan, the per-depth mean softmax distributions of its repeats
  are averaged, the negative entropy taken per sequence (and per head for
  attention) and averaged; the terms are summed over unique blocks (and over
  the V and O routers) and weighted by model.moe.mlp_balance / att_balance.

  cfg: ModelConfig or Config. Returns (loss, metrics) with metrics
  moe/mlp_balance, moe/att_balance (unweighted sums), moe/balance_loss,
  moe/mlp_frac [U, E] (share of tokens per expert, mean over repeats; U
  unique blocks in plan order), moe/mlp_dead and moe/att_dead (experts no
  token chose at any repeat). A model without MoE aux gives (0, {}).
  """
  moe = cfg.moe if hasattr(cfg, "moe") else cfg.model.moe
  coef = {"mlp": moe.mlp_balance, "att": moe.att_balance}
  present = [k for k in _REGULARISED if k in aux]
  if not present:
    return jnp.zeros((), jnp.float32), {}
  raw = {"mlp": jnp.zeros((), jnp.float32), "att": jnp.zeros((), jnp.float32)}
  dead = {"mlp": jnp.zeros((), jnp.int32), "att": jnp.zeros((), jnp.int32)}
  metrics = {}
  for key in present:
    usage_key, kind = _REGULARISED[key]
    for p in _per_block(aux[key].astype(jnp.float32), plan):  # [U, C, (B, H,) E]
      ne = neg_entropy(p.mean(1))  # [U, (B, H)]
      raw[kind] = raw[kind] + ne.reshape(ne.shape[0], -1).mean(1).sum()
    usage = _per_block(aux[usage_key].astype(jnp.float32), plan)  # [U, C, (H,) E]
    dead[kind] = dead[kind] + sum(jnp.sum(u.sum(1) == 0).astype(jnp.int32) for u in usage)
    if key == "mlp_probs":
      metrics["moe/mlp_frac"] = jnp.concatenate([u.mean(1) for u in usage])
  loss = coef["mlp"] * raw["mlp"] + coef["att"] * raw["att"]
  metrics["moe/balance_loss"] = loss
  if "mlp_probs" in present:
    metrics.update({"moe/mlp_balance": raw["mlp"], "moe/mlp_dead": dead["mlp"]})
  if "att_v_probs" in present or "att_o_probs" in present:
    metrics.update({"moe/att_balance": raw["att"], "moe/att_dead": dead["att"]})
  return loss, metrics
