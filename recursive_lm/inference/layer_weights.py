"""The model's weights (and KV cache) laid out for a decode loop: every
stacked per-layer array split into its layers outside the loop, restacked
inside it.

A stage stores its blocks, depth slots and K/V projections stacked on a
leading axis [U, ...] (`recursion.StageModule`). A decode step that walks the
depth layer by layer takes layer i of each (a[i]): inside a jitted loop XLA:CPU
gives that slice its own buffer before the matmul (a library call) reads it,
so every decode step copied every weight of the model once. On Gemma 3 270M
at batch 1 these copies were about half of the step time (profiled: 8.8 s of
17 s). The scanned path does the same with a dynamic slice per iteration.

`split_layers` (outside the jitted function, or at least outside its loop)
turns each stacked array into a tuple of its slices: separate buffers, copied
once. `join_layers` (inside the loop body) stacks them back, and the model's
own a[i] of that stack is folded by XLA's simplifier into the piece itself
(slice of a concatenation), so the matmuls read the weights where they lie.
The values are the model's own; only where they live changes.

The KV cache [L, B, S, K, Hd] has the same problem: the step took each
layer's slice (a copy) and stacked the updated slices again (another copy),
two copies of the whole cache per step. Carried through the loop as
per-layer pieces (`unstack` outside, `restack` at the top of the body and
`unstack` of the step's new cache at its end, both folded by XLA), each
layer's cache is updated in place.
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Layout(NamedTuple):
  """Static description of a split state: its tree structure and, per leaf,
  whether it was split (a per-layer stacked array under `stages`)."""
  treedef: jax.tree_util.PyTreeDef
  stacked: tuple[bool, ...]


def _is_stacked(path) -> bool:
  # Everything a StageModule holds is built by `recursion.stacked` (nnx.vmap): a leading layer axis.
  return bool(path) and getattr(path[0], "key", None) == "stages"


def split_layers(state) -> tuple[Layout, list]:
  """nnx.State of a Transformer -> (layout, pieces): pieces[j] is leaf j, or
  for a stacked leaf [U, ...] the tuple of its U slices [...].

  The split is a copy of the layer weights (on Gemma 3 270M about 2 s on a
  busy 2-core CPU, as long as 20 decode steps), so the last split is kept
  and returned again while the state holds the very same arrays (compared by
  identity; an update of the model replaces its arrays). It is dropped as
  soon as one of those arrays is freed.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(state)
  leaves = [leaf for _, leaf in flat]
  hit = _last.get("split")
  if hit is not None and hit[0] == treedef and len(hit[1]) == len(leaves) and all(
      r() is leaf for r, leaf in zip(hit[1], leaves)):
    return hit[2], hit[3]
  stacked = tuple(_is_stacked(path) for path, _ in flat)
  layout, pieces = Layout(treedef, stacked), _split(leaves, stacked)
  _last.clear()
  token = object()  # this entry, so a late callback of an older one cannot drop a newer one
  drop = lambda _: _last.pop("split") if _last.get("split", (None,) * 5)[4] is token else None
  _last["split"] = (treedef, [weakref.ref(leaf, drop) for leaf in leaves], layout, pieces, token)
  return layout, pieces


_last: dict = {}  # {"split": (treedef, weakrefs to the leaves, layout, pieces, token)}: one entry


@functools.partial(jax.jit, static_argnums=1)
def _split(leaves: list, stacked: tuple[bool, ...]) -> list:
  # One compiled call: op-by-op slicing would dispatch once per layer and weight.
  return [tuple(leaf[i] for i in range(leaf.shape[0])) if s else leaf for leaf, s in zip(leaves, stacked)]


def join_layers(layout: Layout, pieces: list):
  """The state `split_layers` took apart (inside a jitted function)."""
  leaves = [jnp.stack(p) if s else p for p, s in zip(pieces, layout.stacked)]
  return jax.tree_util.tree_unflatten(layout.treedef, leaves)


def unstack(tree):
  """Every leaf [L, ...] of tree -> the tuple of its L slices."""
  return jax.tree.map(lambda a: tuple(a[i] for i in range(a.shape[0])), tree)


def restack(tree):
  """The inverse of `unstack`."""
  return jax.tree.map(jnp.stack, tree, is_leaf=lambda x: isinstance(x, tuple))
