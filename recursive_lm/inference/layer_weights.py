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

`packed_copy` (matmul='native' of `generate`, `Engine` and the CLIs) goes
one step further on CPU: a copy of the model whose dense weights are laid
out once for the small-row kernel of `model.native`.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from recursive_lm.model import layers, native


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
  busy 2-core CPU, as long as 20 decode steps), so it is kept and returned
  again while the state holds the very same arrays (`_memo`).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(state)

  def split():
    stacked = tuple(_is_stacked(path) for path, _ in flat)
    return Layout(treedef, stacked), _split([leaf for _, leaf in flat], stacked)

  return _memo("split", treedef, [leaf for _, leaf in flat], split)


def _memo(name: str, treedef, leaves: list, compute):
  """compute(), or what it returned before for `name` and the very same
  leaves (compared by identity: an update of a model replaces its arrays).
  An entry per name and model (two models decoded in turn keep theirs), each
  dropped as soon as one of its leaves is freed."""
  key = (name, id(leaves[0]) if leaves else None)
  hit = _last.get(key)
  if hit is not None and hit[0] == treedef and len(hit[1]) == len(leaves) and all(
      r() is leaf for r, leaf in zip(hit[1], leaves)):
    return hit[2]
  value = compute()
  token = object()  # this entry, so a late callback of an older one cannot drop a newer one
  # Bound to the dict itself: a leaf freed at interpreter exit may outlive the module's globals.
  drop = lambda _, memo=_last: memo.pop(key) if memo.get(key, (None,) * 4)[3] is token else None
  _last[key] = (treedef, [weakref.ref(leaf, drop) for leaf in leaves], value, token)
  return value


_last: dict = {}  # {(name, id of the first leaf): (treedef, weakrefs to the leaves, value, token)}


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


# ----------------------------------------------------------------------------
# Packed weights for the native CPU matmul (`model.native`).

MATMULS = ("xla", "native")


@dataclasses.dataclass(frozen=True)
class PackedLinear:
  """The `Dense.matmul` of a packed copy: x @ W from pack(W) (hashable, so a
  graphdef holding it is a stable jit key)."""
  n: int

  def __call__(self, x: jax.Array, p: jax.Array) -> jax.Array:
    return native.packed_matmul(x, p, self.n)


def decode_model(model, matmul: str = "xla"):
  """The model a decode loop runs: `model` itself for matmul='xla', its
  `packed_copy` for 'native'. ValueError for another name."""
  if matmul not in MATMULS:
    raise ValueError(f"matmul={matmul!r} must be one of {MATMULS}")
  return model if matmul == "xla" else packed_copy(model)


def packed_copy(model):
  """A copy of `model` whose dense weights (`layers.Dense`, stacked or not)
  and tied readout table are packed for `native.packed_matmul`: the same
  function, computed by a CPU custom call that reads the weights near the
  memory bandwidth (on Gemma 3 270M at 8 rows: the readout 1.6x, the layers
  2x as fast as XLA's dot; experiments/gemma3_convert). Training
  and anything else keep using `model`; the copy holds every other array of
  it as is (its own packed weights, plus the embedding table, which the
  token lookup still reads).

  Kept while the model holds the same arrays (`_memo`), so repeated decode
  calls reuse one copy and one compiled program. ValueError for a model
  that does not compute in float32 or whose arrays are not on the CPU;
  ConfigError (from `native.ensure_built`) when the kernel cannot be built.
  """
  cfg = model.cfg
  if cfg.compute_dtype != "float32" or cfg.param_dtype != "float32":
    raise ValueError(f"matmul='native' computes in float32: model.compute_dtype={cfg.compute_dtype!r}, "
                     f"model.param_dtype={cfg.param_dtype!r}")
  graphdef, state = nnx.split(model)
  leaves = jax.tree.leaves(state)
  platforms = {d.platform for leaf in leaves for d in leaf.devices()}
  if platforms != {"cpu"}:
    raise ValueError(f"matmul='native' runs on the CPU; the model's arrays are on {sorted(platforms)}")
  native.ensure_built()

  def pack():
    # One device: the custom call is not partitioned (a model built under a mesh is gathered).
    copy = nnx.merge(graphdef, jax.device_put(state, min(leaves[0].devices(), key=lambda d: d.id)))
    for _, module in nnx.iter_modules(copy):
      if isinstance(module, layers.Dense):
        w = module.kernel[...]
        module.kernel = nnx.Param(native.pack(w))
        module.matmul = PackedLinear(w.shape[-1])
    if copy.head is None:  # tied: the readout is table^T
      copy.embed.readout = nnx.Param(native.pack(copy.embed.table[...].T))
    return copy

  return _memo("packed", jax.tree.structure(state), leaves, pack)
