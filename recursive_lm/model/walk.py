"""The one walk of the depth: a list of effective layers run in order, with hooks.

Every path that runs the depth layer by layer is a client of `walk`: the
unrolled reference (and KV sharing, whose layers are no longer alike), the
exit walks (decoding with exits, teacher-forced exits, recurrent exits), the
speculation draft (a prefix of the layers) and the probes (a hook after every
layer). What differs between them is the layer list and the hooks:

  loop_start(x, j) -> x           before loop j (0-based) of the plan's loop
                                  starts: input injection, re-embedding
  loop_end(x, j, frozen) -> frozen  after loop j's last layer: exit decisions
                                  (returns the rows frozen from now on; None:
                                  none), loop states for per-loop losses
  layer_end(x, layer)             after every layer: probes

A loop is one pass over the loop stage's U blocks in cycle order (`plan.Loop`),
so loop j starts at block 0 of repeat j and ends at block U - 1.

Frozen rows (`frozen` bool [B], or [B, T] for positions) keep their residual
stream through every later layer, which still writes their K/V (projected
from the frozen state: CALM's propagation, so later tokens find K/V at every
layer). With `gate`, once a loop has ended every layer writes its K/V first
(`kv.fill`) and runs the rest only while some row is not frozen (a
`lax.cond`): when every row has exited, the remaining depth costs only the
K/V projections.

The specialised paths that buy speed or memory (the nested scan, the
traced-count recurrent loop, gathered Mixture-of-Recursions training, the
per-row depth-wise tick) are tested against this walk.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from recursive_lm import plan as plan_lib
from recursive_lm.model import kv as kv_lib
from recursive_lm.model.recursion import apply_layer, wrap_remat


class Hooks(NamedTuple):
  loop_start: Callable | None = None
  loop_end: Callable | None = None
  layer_end: Callable | None = None


NO_HOOKS = Hooks()


def _keep(frozen, x, new):
  """new, except where frozen (bool [B] or [B, T]) keeps x."""
  return jnp.where(frozen.reshape(frozen.shape + (1,) * (x.ndim - frozen.ndim)), x, new)


def walk(model, layers: list[plan_lib.Layer], x: jax.Array, ctx, cache: list[dict] | None = None, *,
         remat: str = "none", hooks: Hooks = NO_HOOKS, frozen: jax.Array | None = None, gate: bool = False):
  """Run `layers` (records of `model.plan`, or of `Plan.loop_layers` at a
  test-time loop count, in order) on x [B, T, D].

  cache: the model's KV cache (`model.kv` layout; entries at ctx.cache_index)
  or None. Returns (x, cache, aux stacked per layer {name: [len(layers)]},
  frozen)."""
  store = model.kv
  loop = model.plan.looped
  cycle = loop is not None and loop.order == "cycle"
  transient = store.transient() if cache is None else None
  gated, auxes = False, []
  for layer in layers:
    stage = model.stages[layer.stage]
    in_loop = cycle and layer.stage == loop.stage
    if in_loop and layer.block == 0 and hooks.loop_start is not None:
      x = hooks.loop_start(x, layer.repeat)
    entry = transient.read(layer) if cache is None else store.read(cache, layer)
    if gated and frozen is not None:
      # K/V for every row outside the branch (so the cache is never a branch output, which would copy it),
      # then the full layer only while some row still runs: it writes the same K/V again.
      if cache is not None:
        entry = kv_lib.fill(stage, layer, x, ctx, entry)
        cache = store.write(cache, layer, entry)

      def run(op, stage=stage, layer=layer):
        x, frozen, entry = op
        new, _, aux = apply_layer(stage, layer, x, ctx, entry)
        return _keep(frozen, x, new), aux

      skip = lambda op: (op[0], jax.tree.map(jnp.zeros_like, jax.eval_shape(run, op)[1]))
      x, aux = jax.lax.cond(jnp.all(frozen), skip, run, (x, frozen, entry))
    else:
      run = wrap_remat(lambda x, e, stage=stage, layer=layer: apply_layer(stage, layer, x, ctx, e), remat)
      new, entry, aux = run(x, entry)
      if cache is None:
        transient.write(layer, entry)
      else:
        cache = store.write(cache, layer, entry)
      x = new if frozen is None else _keep(frozen, x, new)
    auxes.append(aux)
    if hooks.layer_end is not None:
      hooks.layer_end(x, layer)
    if in_loop and layer.block == loop.unique_blocks - 1 and hooks.loop_end is not None:
      frozen = hooks.loop_end(x, layer.repeat, frozen)
      gated = gate
  aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes else {}
  return x, cache, aux, frozen
