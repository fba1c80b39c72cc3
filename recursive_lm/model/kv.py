"""The KV store: where every effective layer's keys and values live.

The cache is a list of entries, each a dict {'k','v'} [N, B, S, K, Hd]
(+ 'valid' [N, B, S] bool for a routed stage: which tokens each recursion
step chose, `mor.run_causal`):

  no KV sharing        one entry per stage, N = its effective layers (U * C;
                       U * loops for a recurrent core at a test-time loop
                       count); layer -> (its stage, depth - the stage's first)
  model.kv_sharing     one entry for the whole depth, N = Plan.kv_slots;
                       layer -> (0, layer.kv_slot); only writers store
  routers (model.mor)  per stage as without sharing (the routed stage's runner
                       reads and writes its entry as a whole)

`read` / `write` are the only code that indexes the cache by layer; every
walk and decode program goes through them. Without a cache (training, the
cache-free forward) a shared slot's K/V still travel from writer to readers:
`transient()` gives a store for the T tokens of one call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from recursive_lm import plan as plan_lib
from recursive_lm.model.recursion import layer_modules


@dataclasses.dataclass(frozen=True)
class KVStore:
  plan: plan_lib.Plan
  num_kv_heads: int
  head_dim: int

  @property
  def shared(self) -> bool:
    """One entry for the whole depth (KV sharing without routers)."""
    return self.plan.kv_sharing != "none" and not self.plan.routed

  def _starts(self) -> list[int]:
    out, d = [], 0
    for s in self.plan.stages:
      out.append(d)
      d += s.depth
    return out

  def init(self, batch: int, max_len: int, dtype, loops: int | None = None) -> list[dict]:
    """Zeroed cache in this layout. loops: the loop run that many times (a
    recurrent core at a test-time count: U * loops entries for its stage)."""
    shape = lambda n: (n, batch, max_len, self.num_kv_heads, self.head_dim)
    zeros = lambda n: {"k": jnp.zeros(shape(n), dtype), "v": jnp.zeros(shape(n), dtype)}
    if self.shared:
      return [zeros(self.plan.kv_slots)]
    depths = [s.depth for s in self.plan.stages]
    loop = self.plan.looped
    if loops is not None:
      depths[loop.stage] = loop.unique_blocks * int(loops)
    cache = [zeros(d) for d in depths]
    if self.plan.routed:
      cache[loop.stage]["valid"] = jnp.zeros((depths[loop.stage], batch, max_len), bool)
    return cache

  def where(self, layer: plan_lib.Layer) -> tuple[int, int]:
    """(entry, index) of the K/V `layer` reads and, if it writes, writes."""
    if self.shared:
      return 0, layer.kv_slot
    return layer.stage, layer.depth - self._starts()[layer.stage]

  def read(self, cache: list[dict], layer: plan_lib.Layer) -> dict:
    """This layer's entry {'k','v'} [B, S, K, Hd]."""
    e, i = self.where(layer)
    return jax.tree.map(lambda a: a[i], cache[e])

  def write(self, cache: list[dict], layer: plan_lib.Layer, entry: dict) -> list[dict]:
    """The cache with `layer`'s entry replaced (unchanged for a reader of a shared slot)."""
    if self.shared and not layer.kv_write:
      return cache
    e, i = self.where(layer)
    cache = list(cache)
    cache[e] = jax.tree.map(lambda a, v: a.at[i].set(v), cache[e], entry)
    return cache

  def transient(self) -> "Transient":
    return Transient(self.plan.kv_sharing != "none")


class Transient:
  """The K/V a cache-free call hands from a shared slot's writer to its readers."""

  def __init__(self, shared: bool):
    self.shared, self.slots = shared, {}

  def read(self, layer: plan_lib.Layer):
    return None if not self.shared or layer.kv_write else self.slots[layer.kv_slot]

  def write(self, layer: plan_lib.Layer, entry) -> None:
    if self.shared and layer.kv_write:
      self.slots[layer.kv_slot] = entry


def fill(stage, layer: plan_lib.Layer, x: jax.Array, ctx, entry: dict) -> dict:
  """Only the K/V that `layer` writes for x [B, T, D] (`Block.write_kv`), with
  the layer's block, depth slot, rotary kind and window: the keys of a layer a
  token skips (early exit), projected from its exit state."""
  if stage.shared_kv and not layer.kv_write:
    return entry
  block, slot, kv_proj, kv_lora = layer_modules(stage, layer)
  return block.write_kv(x, slot, ctx.for_layer(rope=layer.rope, window=layer.window), entry, kv_proj, kv_lora)
