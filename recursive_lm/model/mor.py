"""Mixture-of-Recursions (Bae et al. 2025) in training: routers choose, per
token, how many recursions of the plan's repeated stage it takes.

A recursion step r (0 <= r < R, R = the stage's repeats) is one pass over the
stage's U unique blocks (cycle order: step r runs effective layers r*U ..
r*U + U - 1 with their own depth slots). Step r works on k_r =
ceil(capacity_r * T) tokens of each row, chosen among the tokens step r - 1
kept (all T before step 0), so the chosen sets are nested and a token's depth
is the number of steps that chose it.

  expert  one router per step: logit_r = h @ w[:, r] + b[r] on the residual
          stream h entering the step; the step keeps the k_r highest logits
          among the tokens still active (a top-k over the sequence: not
          causal). Auxiliary loss: binary cross-entropy of logit_r against
          "chosen" over the step's candidates (mean per row, summed over
          steps), weight model.mor.bce_coef, so that generation can threshold
          sigmoid(logit_r) at 0.5 instead.
  token   one router at the stage's start: softmax over R depths, depth =
          argmax + 1 (top-1). Step r's candidates are the tokens still active
          whose depth is > r; the gathered buffer holds k_r of them (the
          capacities size the buffer: when more tokens ask for step r, the
          ones with the lowest probability of going at least r + 1 deep stop
          early). Auxiliary loss: Switch-style balance R * sum_d f_d P_d per
          row (f: share of tokens given depth d, P: mean probability of d),
          weight model.mor.balance_coef.

Update of a chosen token, with f(h) the U blocks applied to h (each with its
residual) and g the router's value for it (expert: sigmoid(logit_r); token:
the probability of the depth it was given):

  scaled  h <- h + s * g * (f(h) - h)     s = model.mor.router_scale (0.1)
  unit    h <- f(h) + (g - stop_gradient(g)) * (f(h) - h)

`unit` is the plain recursive update in value (exactly f(h)) with a
straight-through gradient to the router's weights (g is computed from
stop_gradient(h), so this term sends nothing into the residual stream);
with every capacity 1 the model then equals the plain recursive model in
values and in the language-model loss's gradient of every shared parameter
(tested). The auxiliary losses reach the residual stream in both weightings. The paper's form is
`scaled`: g * f'(h) + h with f' the step's update, here f(h) - h, so several
blocks per step are one update. Tokens a step does not choose keep h.

Execution (model.mor.execution):

  gather  the chosen tokens of each row are gathered into [B, k_r, D] (valid
          tokens first, in position order), the step runs on them only, and
          the results are scattered back: a step costs O(k_r), not O(T).
          Attention among the gathered tokens is causal by gathered index,
          which equals causal by original position because the gather keeps
          position order; rotary tables come from the original positions.
          Buffer entries that hold no valid token (token routing with fewer
          candidates than k_r) sit after every valid one, so no valid query
          sees them, and they are written back unchanged.
  mask    the reference: every step runs on all T tokens; attention keys of
          unchosen tokens are hidden from chosen queries (per-row positions),
          and unchosen tokens keep h. Same values and gradients as gather.

KV in training (the attention pattern each generation-time cache implies):

  recursion-wise caching (model.kv_sharing='none'): a step's tokens attend
          only to the tokens the same step chose, whose K/V it computes. In
          generation each step's KV slots then hold only the tokens that step
          selected, at their positions; a token a router stops writes no
          later step's slot.
  recursion-wise sharing (model.kv_sharing='recursion'): step 0's layers
          write K/V for the tokens step 0 chose; a later step's tokens attend
          (causally, by original position) to those, through the KV-slot map
          of `recursive_lm.plan` (later repeats read the first repeat's
          slot). In generation only step 0 writes the cache: every token
          step 0 takes has its K/V there for every later step.

Generation (`run_causal`): top-k over a sequence is not causal, so each
token decides alone, from its own residual stream, in any forward that uses
a KV cache (and, as the reference, in the cache-free forward with
routing='threshold'):

  expert  step r takes a token that step r - 1 took (every token for r = 0)
          when sigmoid(logit_r) >= 0.5, the threshold the BCE loss trains
          for; a step of capacity 1 takes every candidate, as its top-k does
          in training (top-k of all candidates is causal).
  token   argmax depth (top-1), with no buffer limit: a token takes exactly
          the depth it was given.

A chosen token's update is the training one (`_update`, with the same g).
The KV cache of the routed stage carries, next to 'k' and 'v' [U*R, B, S, K,
Hd], 'valid' [U*R, B, S] bool: whether the token at that position was chosen
by the entry's step. Attention reads only valid keys (`attention.
cached_causal_attention`), so recursion-wise caching (each step's entries
hold the tokens that step chose) and recursion-wise sharing (later steps read
step 0's entries, which hold the tokens step 0 chose) give the attention
pattern of training. Every step writes its 'valid' at every new position
(True or False), so nothing a position held before (padding, an earlier
request in an engine slot) is ever read as a key. The layers of a step run
on every token of the chunk (a masked step: an unchosen token's result is
dropped); compute is skipped per token by the depth-wise engine
(`inference.depthwise`), where a token the router stops leaves its slot.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from recursive_lm import axes
from recursive_lm import plan as plan_lib
from recursive_lm.config import ModelConfig
from recursive_lm.model.attention import Context, write_cache
from recursive_lm.model.layers import NormParam, normal
from recursive_lm.model.recursion import StageModule, _take, apply_layer, wrap_remat


def step_sizes(capacities: tuple[float, ...], t: int) -> tuple[int, ...]:
  """Tokens per row each step runs on: k_r = ceil(capacity_r * T), at least 1
  (the small tolerance keeps 2/3 * 3 at 2 despite float rounding)."""
  return tuple(min(t, max(1, math.ceil(c * t - 1e-9))) for c in capacities)


class Router(nnx.Module):
  """Router weights w [D, R] and biases b [R] (not weight-decayed): expert
  routing reads column r at step r; token routing reads all R as depth logits."""

  def __init__(self, cfg: ModelConfig, steps: int, rngs: nnx.Rngs):
    d, pd = cfg.d_model, jnp.dtype(cfg.param_dtype)
    self.w = nnx.Param(normal(d**-0.5)(rngs.params(), (d, steps), pd), out_sharding=(axes.EMBED, None))
    self.b = NormParam(jnp.zeros((steps,), pd), out_sharding=(None,))

  def __call__(self, x: jax.Array, step: int | None = None) -> jax.Array:
    """x [B, T, D] -> float32 logits [B, T] (step r's router) or [B, T, R] (step None)."""
    w, b = self.w[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
    if step is not None:
      w, b = w[:, step], b[step]
    return jnp.einsum("btd,d...->bt...", x.astype(jnp.float32), w) + b


def select(score: jax.Array, candidate: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k highest-scoring candidates of each row.

  score [B, T] float, candidate [B, T] bool -> (idx [B, k] int32, valid [B, k]
  bool). idx holds the chosen candidates in position order, then, when a row
  has fewer than k candidates, other tokens (valid False) in position order.
  """
  t = score.shape[1]
  _, top = jax.lax.top_k(jnp.where(candidate, score, -jnp.inf), k)
  valid = jnp.take_along_axis(candidate, top, axis=1)
  order = jnp.argsort(jnp.where(valid, top, top + t), axis=1)
  return jnp.take_along_axis(top, order, axis=1).astype(jnp.int32), jnp.take_along_axis(valid, order, axis=1)


def _update(h, f, g, weighting: str, scale: float):
  """The chosen tokens' new residual stream (see module doc). h, f [..., D]; g [...]."""
  g = g[..., None].astype(f.dtype)
  if weighting == "unit":
    return f + (g - jax.lax.stop_gradient(g)) * (f - h)
  return h + (scale * g) * (f - h)


def _run_step(stage: StageModule, layers, x, ctx: Context, remat: str, store: dict):
  """The step's layers on x; under recursion-wise KV sharing the layers that
  write a KV slot (step 0) put its K/V and key positions into `store`, and the
  later steps' layers attend to them."""
  auxes = []
  for layer in layers:
    entry = store.get(layer.kv_slot) if stage.shared_kv and not layer.kv_write else None
    run = wrap_remat(lambda x, e, layer=layer: apply_layer(stage, layer, x, ctx, e), remat)
    x, entry, aux = run(x, entry)
    if stage.shared_kv and layer.kv_write:
      store[layer.kv_slot] = {**entry, "pos": ctx.positions}
    auxes.append(aux)
  return x, auxes


def _rows(fn, *arrays):
  """fn applied to each row (batch entry) of the arrays: gathers and scatters
  that keep the batch axis a batch axis (so a batch-sharded x stays sharded)."""
  return jax.vmap(fn)(*arrays)


def _gathered_step(stage, layers, x, ctx: Context, idx, valid, g, mcfg, remat: str, store: dict):
  """One recursion step on the gathered tokens idx [B, k] of x [B, T, D]."""
  h = _rows(lambda xr, i: xr[i], x, idx)  # [B, k, D]
  # Positions in gathered order: causal by index = causal by original position (idx is sorted), so the
  # attention kernel runs as for any chunk. Under KV sharing later steps read step 0's keys, which need
  # the original positions (per row: the reference attention path).
  pos = idx if stage.shared_kv else jnp.arange(idx.shape[1], dtype=jnp.int32)
  gctx = Context(jnp.take(ctx.cos, idx, axis=1), jnp.take(ctx.sin, idx, axis=1), pos)
  f, auxes = _run_step(stage, layers, h, gctx, remat, store)
  g = _rows(lambda gr, i: gr[i], g, idx)
  new = jnp.where(valid[..., None], _update(h, f, g, mcfg.weighting, mcfg.router_scale), h)
  return _rows(lambda xr, i, nr: xr.at[i].set(nr), x, idx, new), auxes


def _masked_step(stage, layers, x, ctx: Context, chosen, g, mcfg, remat: str, store: dict):
  """The same step on all T tokens, with unchosen keys hidden (the reference)."""
  t = x.shape[1]
  pos = jnp.arange(t, dtype=jnp.int32)
  mctx = ctx._replace(positions=jnp.where(chosen, pos, pos + t), cache_index=None)  # unchosen: after every chosen
  f, auxes = _run_step(stage, layers, x, mctx, remat, store)
  return jnp.where(chosen[..., None], _update(x, f, g, mcfg.weighting, mcfg.router_scale), x), auxes


def run_routed(stage: StageModule, router: Router, x: jax.Array, ctx: Context, layers: list[plan_lib.Layer],
               mcfg, remat: str):
  """Run the routed stage on x [B, T, D] (no KV cache).

  layers: the stage's layer records (`plan.stage_layers`, cycle order);
  mcfg: the model.mor config (`recursive_lm.config.MoRConfig`). Returns
  (x, aux per effective layer stacked [U*R], router aux) with router aux
  {'router_loss': unweighted auxiliary loss (scalar), 'router_depth': [B, T]
  int32 recursions each token took}.
  """
  spec = stage.spec
  u, r_n = spec.unique_blocks, spec.repeats
  b, t = x.shape[:2]
  sizes = step_sizes(mcfg.capacities, t)
  active = jnp.ones((b, t), bool)
  depth = jnp.zeros((b, t), jnp.int32)
  all_aux, loss, store = [], jnp.zeros((), jnp.float32), {}
  # unit weighting: the straight-through term trains the router's weights only (it reads the residual stream
  # through stop_gradient), so every other parameter gets the plain update's gradient.
  unit = mcfg.weighting == "unit"
  if mcfg.routing == "token":
    probs = jax.nn.softmax(router(x), axis=-1)  # [B, T, R]
    given = jnp.argmax(probs, axis=-1)  # depth - 1
    g_probs = jax.nn.softmax(router(jax.lax.stop_gradient(x)), axis=-1) if unit else probs
    g_tok = jnp.take_along_axis(g_probs, given[..., None], axis=-1)[..., 0]
    at_least = jnp.flip(jnp.cumsum(jnp.flip(probs, -1), -1), -1)  # [B, T, R]: P(depth >= r + 1)
    f_d = jax.nn.one_hot(given, r_n).mean(1)  # [B, R]
    loss = (r_n * jnp.sum(f_d * probs.mean(1), -1)).mean()
  for r in range(r_n):
    if mcfg.routing == "expert":
      logit = router(x, r)
      g = jax.nn.sigmoid(router(jax.lax.stop_gradient(x), r) if unit else logit)
      score, candidate = logit, active
    else:
      score, candidate, g = at_least[..., r], active & (given >= r), g_tok
    idx, valid = select(score, candidate, sizes[r])
    chosen = _rows(lambda i, v: jnp.zeros((t,), bool).at[i].set(v), idx, valid)
    if mcfg.routing == "expert":  # BCE of the step's router over its candidates (all of which it could take)
      bce = optax.sigmoid_binary_cross_entropy(logit, chosen.astype(jnp.float32))
      loss = loss + (jnp.sum(bce * active, 1) / jnp.maximum(active.sum(1), 1)).mean()
    step_layers = layers[r * u:(r + 1) * u]
    if mcfg.execution == "gather":
      x, auxes = _gathered_step(stage, step_layers, x, ctx, idx, valid, g, mcfg, remat, store)
    else:
      x, auxes = _masked_step(stage, step_layers, x, ctx, chosen, g, mcfg, remat, store)
    all_aux += auxes
    active = chosen
    depth = depth + chosen
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *all_aux)
  return x, stacked, {"router_loss": loss, "router_depth": depth}


def router_loss(aux: dict, mcfg, repeats: int) -> tuple[jax.Array, dict]:
  """The weighted auxiliary loss and the router metrics from `run_routed`'s aux.

  Metrics: router/aux_loss (unweighted), router/loss (weighted),
  router/depth_frac [R + 1] (share of tokens that took d = 0..R recursions),
  router/step_frac [R] (share of tokens step r ran on). Means over rows, so
  the mean over equal micro-batches is the whole batch's value.
  """
  if "router_depth" not in aux:
    return jnp.zeros((), jnp.float32), {}
  coef = mcfg.bce_coef if mcfg.routing == "expert" else mcfg.balance_coef
  depth = aux["router_depth"]
  depth_frac = jax.nn.one_hot(depth, repeats + 1).mean((0, 1))
  step_frac = jnp.stack([(depth > r).mean() for r in range(repeats)])
  loss = coef * aux["router_loss"]
  return loss, {"router/aux_loss": aux["router_loss"], "router/loss": loss, "router/depth_frac": depth_frac,
                "router/step_frac": step_frac}


# ----------------------------------------------------------------------------
# Generation: causal routing (see the module doc).


def token_depths(router: Router, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Token routing's choice on x [B, T, D] (the stream entering the stage):
  (given [B, T] int32: depth - 1, the argmax; g [B, T]: its probability)."""
  probs = jax.nn.softmax(router(x), axis=-1)
  given = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  return given, jnp.take_along_axis(probs, given[..., None], axis=-1)[..., 0]


def causal_choice(router: Router, mcfg, x: jax.Array, step, active: jax.Array, token=None):
  """Which tokens step `step` takes in generation: (chosen [B, T] bool, g [B, T]).

  x [B, T, D]: the stream entering the step; step: an int, or one per row
  int [B] (depth-wise batching: rows at different steps); active [B, T]: the
  tokens the previous step took (all for step 0); token: `token_depths`'s
  (given, g) for token routing (None for expert routing).
  """
  if mcfg.routing == "token":
    given, g = token
    return active & (given >= jnp.asarray(step)[..., None]), g
  if isinstance(step, int):
    logit = router(x, step)
    full = mcfg.capacities[step] >= 1
  else:  # one step per row: that step's router column for each row
    w, b = router.w[...].astype(jnp.float32)[:, step], router.b[...].astype(jnp.float32)[step]  # [D, B], [B]
    logit = jnp.einsum("btd,db->bt", x.astype(jnp.float32), w) + b[:, None]
    full = (jnp.asarray(mcfg.capacities, jnp.float32) >= 1)[step][:, None]
  g = jax.nn.sigmoid(logit)
  return active & (full | (g >= 0.5)), g


def apply_update(x: jax.Array, f: jax.Array, chosen: jax.Array, g: jax.Array, mcfg) -> jax.Array:
  """x [B, T, D] after a step whose layers gave f: the chosen tokens updated (`_update`), the others kept."""
  return jnp.where(chosen[..., None], _update(x, f, g, mcfg.weighting, mcfg.router_scale), x)


def run_causal(stage: StageModule, router: Router, x: jax.Array, ctx: Context, layers: list[plan_lib.Layer],
               mcfg, remat: str, cache: dict | None = None):
  """The routed stage on x [B, T, D] with generation's causal routing.

  cache: the stage's {'k','v' [U*R, B, S, K, Hd], 'valid' [U*R, B, S]}
  written at ctx.cache_index (prefill or decode), or None: the cache-free
  reference, each step masked (`_masked_step`). Returns (x, cache, aux per
  effective layer stacked [U*R], {'router_depth': [B, T] int32}).
  """
  u, r_n = stage.spec.unique_blocks, stage.spec.repeats
  b, t = x.shape[:2]
  active = jnp.ones((b, t), bool)
  depth = jnp.zeros((b, t), jnp.int32)
  token = token_depths(router, x) if mcfg.routing == "token" else None
  # Recursion-wise sharing: a reading layer attends to the entry its KV slot's writer (a step-0 layer) fills.
  writer = {l.kv_slot: l.slot for l in layers if l.kv_write} if stage.shared_kv else {}
  all_aux, store = [], {}
  for r in range(r_n):
    chosen, g = causal_choice(router, mcfg, x, r, active, token)
    step_layers = layers[r * u:(r + 1) * u]
    if cache is None:
      x, auxes = _masked_step(stage, step_layers, x, ctx, chosen, g, mcfg, remat, store)
    else:
      f, auxes = x, []
      for layer in step_layers:
        reads = stage.shared_kv and not layer.kv_write
        n = writer[layer.kv_slot] if reads else layer.slot
        entry = _take(cache, n)
        if not reads:  # this step's keys at the new positions: the tokens it chose
          entry = {**entry, "valid": write_cache(entry["valid"], chosen, ctx.cache_index)}
        run = wrap_remat(lambda f, e, layer=layer: apply_layer(stage, layer, f, ctx, e), remat)
        f, entry, aux = run(f, entry)
        if not reads:
          cache = jax.tree.map(lambda a, e: a.at[n].set(e), cache, entry)
        auxes.append(aux)
      x = apply_update(x, f, chosen, g, mcfg)
    all_aux += auxes
    active = chosen
    depth = depth + chosen
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *all_aux)
  return x, cache, stacked, {"router_depth": depth}
