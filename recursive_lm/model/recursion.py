"""Running a stage of the depth plan: the only file that knows scan, remat and
per-depth slicing.

A stage stores its K unique blocks stacked on a leading axis [K, ...] and its
per-depth things (slots: LoRA / norms; KV cache) stacked on [K * R, ...] in
effective-layer order. Execution is two nested `jax.lax.scan`s, so the traced
program holds one block body whatever K and R are:

  cycle    (1-2-3 1-2-3): outer scan over R repeats, inner scan over the K
           blocks (block weights are the inner xs); per-depth arrays are
           reshaped [R, K, ...].
  sequence (1-1 2-2 3-3): outer scan over K blocks (block weights are the
           outer xs), inner scan over R repeats with that block closed over;
           per-depth arrays are reshaped [K, R, ...].

The inner body is wrapped in `jax.checkpoint` with the configured policy.
`run_unrolled` walks the same plan layer by layer in Python: the reference
the scanned path is tested against.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from recursive_lm import axes
from recursive_lm.model import plan as plan_lib
from recursive_lm.model.attention import Context

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing, recompute the whole block
    # Two levels: the outer scan keeps only the residual stream between outer
    # steps (repeats for cycle order, blocks for sequence order) and recomputes
    # each outer step, whose layers are rematerialised in turn. Activation
    # memory then grows with R (or K) instead of K * R, for a third forward pass.
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
  """Parameters of one stage: blocks [K, ...] and slots [K * R, ...] (or None)."""

  def __init__(self, spec: plan_lib.Stage, make_block, make_slot, rngs: nnx.Rngs):
    self.spec = spec
    self.blocks = stacked(spec.unique_blocks, make_block, rngs)
    self.slots = stacked(spec.depth, make_slot, rngs) if make_slot is not None else None


def _wrap(body, remat: str):
  return body if remat == "none" else jax.checkpoint(body, policy=REMAT_POLICIES[remat])


def _wrap_outer(body, remat: str):
  return jax.checkpoint(body) if remat == "nested" else body


def _fold(tree, a: int, b: int):
  return jax.tree.map(lambda x: x.reshape((a, b) + x.shape[1:]), tree)


def _unfold(tree):
  return jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), tree)


def run_stage(stage: StageModule, x: jax.Array, ctx: Context, cache: dict | None, depth_data: dict, remat: str):
  """Run every effective layer of `stage` on x [B, T, D] with nested scans.

  cache: per-depth {'k','v'} [K*R, B, S, Kv, Hd] or None. depth_data: per-depth
  non-parameter values {name: [K*R]} passed to `Context.for_layer` (rotary
  kind, sliding window), so layers that share weights may still differ there.
  Returns (x, cache, aux) with aux values stacked per effective layer [K*R].
  """
  spec = stage.spec
  k_n, r_n = spec.unique_blocks, spec.repeats
  block_def, block_state = nnx.split(stage.blocks)
  slot_def, slot_state = nnx.split(stage.slots) if stage.slots is not None else (None, None)
  per_depth = (slot_state, cache, depth_data)

  def layer(x, b_state, depth_slice):
    s_state, c, data = depth_slice
    block = nnx.merge(block_def, b_state)
    slot = nnx.merge(slot_def, s_state) if slot_def is not None else None
    x, c, aux = block(x, slot, ctx.for_layer(**data), c)
    return x, (c, aux)

  layer = _wrap(layer, remat)

  if spec.order == "cycle":
    @functools.partial(_wrap_outer, remat=remat)
    def outer(x, depth_r):  # depth_r: [K, ...]
      return jax.lax.scan(lambda x, xs: layer(x, xs[0], xs[1]), x, (block_state, depth_r), length=k_n)
    x, (cache_out, aux) = jax.lax.scan(outer, x, _fold(per_depth, r_n, k_n), length=r_n)
  else:
    @functools.partial(_wrap_outer, remat=remat)
    def outer(x, xs):  # xs: (block k, per-depth [R, ...])
      b_state, depth_k = xs
      return jax.lax.scan(lambda x, d: layer(x, b_state, d), x, depth_k, length=r_n)
    x, (cache_out, aux) = jax.lax.scan(outer, x, (block_state, _fold(per_depth, k_n, r_n)), length=k_n)
  return x, _unfold(cache_out), _unfold(aux)


def run_unrolled(stage: StageModule, x: jax.Array, ctx: Context, cache: dict | None, depth_data: dict,
                 remat: str):
  """Reference: the same stage as a Python loop over effective layers."""
  spec = stage.spec
  block_def, block_state = nnx.split(stage.blocks)
  slot_def, slot_state = nnx.split(stage.slots) if stage.slots is not None else (None, None)
  take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
  caches, auxes = [], []
  for slot_i in range(spec.depth):
    k, _ = spec.block_and_repeat(slot_i)

    def layer(x, b_state, s_state, c, data):
      slot = nnx.merge(slot_def, s_state) if slot_def is not None else None
      return nnx.merge(block_def, b_state)(x, slot, ctx.for_layer(**data), c)

    x, c, aux = _wrap(layer, remat)(x, take(block_state, k), take(slot_state, slot_i),
                                    take(cache, slot_i) if cache is not None else None, take(depth_data, slot_i))
    caches.append(c)
    auxes.append(aux)
  stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
  return x, (stack(caches) if cache is not None else None), stack(auxes)
