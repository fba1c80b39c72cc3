"""Running a stage of the depth plan: the only file that knows scan, remat and
per-depth slicing.

A stage stores its U unique blocks stacked on a leading axis [U, ...] and its
per-depth things (slots: LoRA / norms; KV cache) stacked on [U * C, ...] in
effective-layer order. Execution is two nested `jax.lax.scan`s, so the traced
program holds one block body whatever U and C are:

  cycle    (1-2-3 1-2-3): outer scan over C repeats, inner scan over the U
           blocks (block weights are the inner xs); per-depth arrays are
           reshaped [C, U, ...].
  sequence (1-1 2-2 3-3): outer scan over U blocks (block weights are the
           outer xs), inner scan over C repeats with that block closed over;
           per-depth arrays are reshaped [U, C, ...].

The inner body is wrapped in `jax.checkpoint` with the configured policy.
`apply_layer` runs one effective layer; `recursive_lm.model.walk` runs any
list of them in Python, with hooks: the reference the scanned path is tested
against.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recursive_lm import axes
from recursive_lm import plan as plan_lib
from recursive_lm.model.attention import Context

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing, recompute the whole block
    # Two levels: the outer scan keeps only the residual stream between outer
    # steps (repeats for cycle order, blocks for sequence order) and recomputes
    # each outer step, whose layers are rematerialised in turn. Activation
    # memory then grows with C (or U) instead of U * C, for a third forward pass.
    "nested": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stacked(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """n independently initialised copies of a module, stacked on a leading `layers` axis."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: axes.LAYERS})
  def build(r):
    return make(r)

  return build(rngs)


class StageModule(nnx.Module):
  """Parameters of one stage: blocks [U, ...], slots [U * C, ...] (or None) and,
  with KV sharing, the K/V projections [W, ...] of the W unique blocks that
  write a KV slot (`kv_blocks`, in block order; None without sharing) and the
  K/V adapters [Wd, ...] of the Wd effective layers that write one
  (`kv_depths`: their per-depth slot indices; None without K/V adapters).
  A layer that only reads K/V owns neither."""

  def __init__(self, spec: plan_lib.Stage, make_block, make_slot, rngs: nnx.Rngs, make_kv=None,
               kv_blocks: tuple[int, ...] = (), make_kv_lora=None, kv_depths: tuple[int, ...] = ()):
    self.spec = spec
    self.blocks = stacked(spec.unique_blocks, make_block, rngs)
    self.slots = stacked(spec.depth, make_slot, rngs) if make_slot is not None else None
    self.kv_blocks = tuple(kv_blocks)
    self.kv = stacked(len(kv_blocks), make_kv, rngs) if make_kv is not None and kv_blocks else None
    self.shared_kv = make_kv is not None
    self.kv_depths = tuple(kv_depths) if make_kv_lora is not None else ()
    self.kv_lora = stacked(len(self.kv_depths), make_kv_lora, rngs) if self.kv_depths else None


def wrap_remat(body, remat: str):
  """body under jax.checkpoint with the named policy (model.remat); itself for 'none'."""
  return body if remat == "none" else jax.checkpoint(body, policy=REMAT_POLICIES[remat])


def _wrap_outer(body, remat: str):
  return jax.checkpoint(body) if remat == "nested" else body


def _fold(spec: plan_lib.Stage, tree):
  return jax.tree.map(spec.fold, tree)


def _unfold(tree):
  return jax.tree.map(plan_lib.Stage.unfold, tree)


def run_stage(stage: StageModule, x: jax.Array, ctx: Context, cache: dict | None, depth_data: dict, remat: str,
              inject: Callable | None = None, loop_states: list | None = None, loops: int | None = None):
  """Run every effective layer of `stage` on x [B, T, D] with nested scans.

  cache: per-depth {'k','v'} [U*C, B, S, Kv, Hd] or None. depth_data: per-depth
  non-parameter values {name: [U*C]} passed to `Context.for_layer` (rotary
  kind, sliding window), so layers that share weights may still differ there.
  inject: (x, j) -> x applied at the start of every repeat j (traced int32):
  the model's loop-start hook (the recurrent core's input injection, loop
  re-embedding; cycle order only). loop_states: a list that receives x
  [B, T, D] after every loop but the last of a repeated cycle-order stage
  (the exits' loop boundaries, `exit_readouts`). loops: run a cycle-order
  stage that many times instead of C (a Python int: the recurrent core at a
  test-time count), iteration j with repeat min(j, C - 1)'s slots and depth
  data, and the cache (if any) holding U * loops entries (`Plan.loop_layers`).
  Returns (x, cache, aux) with aux values stacked per effective layer [U*C]
  (U * loops).
  """
  spec = stage.spec
  k_n, r_n = spec.unique_blocks, spec.repeats
  block_def, block_state = nnx.split(stage.blocks)
  slot_def, slot_state = nnx.split(stage.slots) if stage.slots is not None else (None, None)
  per_depth = (slot_state, cache, depth_data)
  folded = _fold(spec, per_depth) if loops is None else _fold_loops(spec, per_depth, loops)
  r_n = r_n if loops is None else loops

  def layer(x, b_state, depth_slice):
    s_state, c, data = depth_slice
    block = nnx.merge(block_def, b_state)
    slot = nnx.merge(slot_def, s_state) if slot_def is not None else None
    x, c, aux = block(x, slot, ctx.for_layer(**data), c)
    return x, (c, aux)

  layer = wrap_remat(layer, remat)

  if spec.order == "cycle":
    @functools.partial(_wrap_outer, remat=remat)
    def outer(x, xs):  # depth_r: [U, ...]; j: the repeat (loop) index, scanned only for a hook
      depth_r, j = xs if inject is not None else (xs, None)
      x = x if inject is None else inject(x, j)
      x, ys = jax.lax.scan(lambda x, xs: layer(x, xs[0], xs[1]), x, (block_state, depth_r), length=k_n)
      return x, (ys, x if loop_states is not None else None)  # the state after this loop, when asked
    xs = folded if inject is None else (folded, jnp.arange(r_n, dtype=jnp.int32))
    x, ((cache_out, aux), states) = jax.lax.scan(outer, x, xs, length=r_n)
    if loop_states is not None and r_n > 1:
      loop_states += [states[r] for r in range(r_n - 1)]
  else:
    assert inject is None and loops is None, "input injection and loop counts need a cycle-order stage"

    @functools.partial(_wrap_outer, remat=remat)
    def outer(x, xs):  # xs: (block k, per-depth [C, ...])
      b_state, depth_k = xs
      return jax.lax.scan(lambda x, d: layer(x, b_state, d), x, depth_k, length=r_n)
    x, (cache_out, aux) = jax.lax.scan(outer, x, (block_state, _fold(spec, per_depth)), length=k_n)
  return x, _unfold(cache_out), _unfold(aux)


def _fold_loops(spec: plan_lib.Stage, per_depth, loops: int):
  """(slots [U*C], cache [U*loops], data [U*C]) -> each [loops, U, ...]:
  iteration j takes repeat min(j, C - 1)'s slots and data (cycle order)."""
  slots, cache, data = per_depth
  take = np.minimum(np.arange(loops), spec.repeats - 1)
  slots, data = jax.tree.map(lambda a: a[take], _fold(spec, (slots, data)))
  cache = jax.tree.map(lambda a: a.reshape((loops, spec.unique_blocks) + a.shape[1:]), cache)
  return slots, cache, data


def apply_layer(stage: StageModule, layer: plan_lib.Layer, x: jax.Array, ctx: Context, cache: dict | None = None):
  """Run one effective layer of `stage` (a record from `plan.stage_layers`) on x [B, T, D].

  The layer is the stage's unique block `layer.block` with the depth's own slot
  `layer.slot` (LoRA, per-depth norms), with its rotary kind and window. ctx is
  the model's Context (tables of every kind, as `Transformer.context` builds
  it). cache: this layer's {'k','v'} [B, S, Kv, Hd] or None. Returns
  (x, cache, aux) like a block. The one per-layer entry point: the unrolled
  reference and the analysis probes run the depth through it.
  """
  block, slot, kv_proj, kv_lora = layer_modules(stage, layer)
  lctx = ctx.for_layer(rope=layer.rope, window=layer.window)
  if not stage.shared_kv:
    return block(x, slot, lctx, cache)
  return block(x, slot, lctx, cache, kv_proj, shared=True, kv_lora=kv_lora)


def layer_modules(stage: StageModule, layer: plan_lib.Layer):
  """(block, depth slot or None, K/V projection or None, K/V adapters or None)
  of one effective layer: its unique block, its per-depth slot, and under KV
  sharing the projection and per-depth K/V adapters of a layer that writes K/V
  (None, None for a reader)."""
  block_def, block_state = nnx.split(stage.blocks)
  block = nnx.merge(block_def, _take(block_state, layer.block))
  slot = None
  if stage.slots is not None:
    slot_def, slot_state = nnx.split(stage.slots)
    slot = nnx.merge(slot_def, _take(slot_state, layer.slot))
  kv_proj = kv_lora = None
  if stage.shared_kv and layer.kv_write:
    kv_def, kv_state = nnx.split(stage.kv)
    kv_proj = nnx.merge(kv_def, _take(kv_state, stage.kv_blocks.index(layer.block)))
    if stage.kv_lora is not None:
      lora_def, lora_state = nnx.split(stage.kv_lora)
      kv_lora = nnx.merge(lora_def, _take(lora_state, stage.kv_depths.index(layer.slot)))
  return block, slot, kv_proj, kv_lora


def _take(tree, i: int):
  return jax.tree.map(lambda a: a[i], tree)


def run_recurrent(stage: StageModule, injection: nnx.Module, s: jax.Array, e: jax.Array, ctx: Context,
                  depth_data: dict, remat: str, loops: jax.Array, backprop_depth: int):
  """The recurrent core run `loops` times (traced: one compiled program serves
  every count) with truncated backprop.

  s: initial state [B, T, D]; e: prelude output [B, T, D], injected at the
  start of every iteration (`injection(s, e)`). An iteration is the stage's U
  unique blocks in order; a row's iteration i uses the per-depth slots (LoRA,
  per-depth norms) and depth data of repeat min(i, C - 1), so counts beyond
  the trained C reuse the last repeat's.

  loops: int32 [] (the whole batch) or [B] (one count per row). Rows are
  aligned at the end: with M = max(loops), row b stays unchanged (masked) for
  the first M - loops[b] iterations and then runs its own iterations 0 ..
  loops[b] - 1, so every row's last k (k = backprop_depth, static) iterations
  fall on the same last k steps. The first max(M - k, 0) steps run in a
  `lax.fori_loop` on stop-gradient inputs: no gradient and no stored
  activations, so memory does not grow with the count. The last k run in a
  scan whose steps before the first counted one leave s unchanged (a
  `lax.cond`: not computed). A row with loops <= k keeps the gradient of its
  initial state. Per-row counts with per-depth slots or data run each row's
  iteration with its own slot (`jax.vmap` over rows). Without a KV cache.
  Returns (s, aux stacked over the scan's k * U layers, zero for skipped steps).
  """
  spec = stage.spec
  k, r_n, u_n = backprop_depth, spec.repeats, spec.unique_blocks
  block_def, block_state = nnx.split(stage.blocks)
  slot_def, slot_state = nnx.split(stage.slots) if stage.slots is not None else (None, None)
  inj_def, inj_state = nnx.split(injection)
  per_depth = _fold(spec, (slot_state, depth_data))  # [C, U, ...]
  loops = jnp.asarray(loops, jnp.int32)
  per_row = loops.ndim == 1
  longest = loops.max()
  by_row = (lambda a: a[:, None, None]) if per_row else (lambda a: a)
  own_slots = per_row and (slot_def is not None or bool(depth_data))  # rows may need different slots

  def layer(x, xs):
    b_state, (s_state, data) = xs
    slot = nnx.merge(slot_def, s_state) if slot_def is not None else None
    x, _, aux = nnx.merge(block_def, b_state)(x, slot, ctx.for_layer(**data), None)
    return x, aux

  layer = wrap_remat(layer, remat)

  def iteration(params, x, e, t):
    """Step t of M: each row's iteration t - (M - loops), where it is >= 0."""
    b_state, depth, i_state = params
    i = jnp.clip(t - longest + loops, 0, r_n - 1)  # [] or [B]

    def one(x, e, depth_i):
      x = nnx.merge(inj_def, i_state)(x, e)
      return jax.lax.scan(layer, x, (b_state, depth_i), length=u_n)

    if own_slots:
      new, aux = jax.vmap(lambda x, e, i: one(x[None], e[None], _take(depth, i)))(x, e, i)
      new, aux = new[:, 0], row_stats(aux)
    else:
      new, aux = one(x, e, _take(depth, i if i.ndim == 0 else 0))
    return jnp.where(by_row(t >= longest - loops), new, x), aux

  params = (block_state, per_depth, inj_state)
  free = jnp.maximum(longest - k, 0)
  frozen, e_frozen = jax.lax.stop_gradient(params), jax.lax.stop_gradient(e)
  ran = jax.lax.fori_loop(0, free, lambda t, x: iteration(frozen, x, e_frozen, t)[0], jax.lax.stop_gradient(s))
  s = jnp.where(by_row(loops > k), ran, s)  # a row with no free iteration keeps its initial state's gradient

  def differentiated(x, j):
    t = longest - k + j
    run = lambda x: iteration(params, x, e, t)
    skip = lambda x: (x, jax.tree.map(jnp.zeros_like, jax.eval_shape(run, x)[1]))
    return jax.lax.cond(t >= 0, run, skip, x)  # a step before the first counted one costs nothing

  s, aux = jax.lax.scan(_wrap_outer(differentiated, remat), s, jnp.arange(k, dtype=jnp.int32))
  return s, _unfold(aux)


def row_stats(stats: dict) -> dict:
  """Diagnostics computed per part [n, ...] -> values for the whole: the root
  mean square of RMS statistics (`*_rms`: exact for parts of equal size), the
  mean of the others."""
  return {name: jnp.sqrt(jnp.mean(jnp.square(v), 0)) if name.endswith("_rms") else v.mean(0)
          for name, v in stats.items()}
