"""The depth plan: parameter sharing across depth, and what every effective
layer does, as plain data.

A model's depth is a list of stages. A stage holds U unique blocks applied C
times, in `cycle` order (1-2-3 1-2-3) or `sequence` order (1-1 2-2 3-3), so
it contributes U * C effective layers. Per-depth parameters (LoRA factors,
per-depth norms) of a stage are stored along one leading axis in
effective-layer order; `Layer.slot` indexes it.

Every effective layer has one record (`Plan.layers()`): its stage, unique
block, repeat, per-depth slot, KV slot (which entry of the KV store it reads,
and whether it is the layer that writes it: `model.kv_sharing`), and its kind
(rotary table, sliding window). Everything else that walks the depth (the
scanned and unrolled runners, the MoE balance loss, the probes, test-time
loop counts, the accounting) reads these records or the helpers below.

No JAX and nothing from model/data/convert here: plans are checked and tested
as ordinary Python values, and the config loader validates with them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

from recursive_lm.errors import ConfigError

ORDERS = ("cycle", "sequence")
KV_SHARING = ("none", "cla:<s>", "mlkv:<n>", "recursion")


class PlanError(ConfigError):
  """A plan that does not fit the requested depth; the message names the numbers."""


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  unique_blocks: int  # U (not K: that letter is kv heads, see recursive_lm.axes)
  repeats: int  # C (not R: that letter is the LoRA rank)
  order: str = "cycle"
  per_depth_norms: bool = False  # only meaningful when the stage repeats
  # A recurrent core (Huginn): the stage's input e is replaced by an initial
  # state, and e is injected into the state at the start of every repeat;
  # its repeat count may change at run time (a loop count). Cycle order only.
  inject: bool = False

  def __post_init__(self):
    if self.order not in ORDERS:
      raise PlanError(f"stage {self.name!r}: order={self.order!r} is not one of {ORDERS}")
    if self.unique_blocks < 1 or self.repeats < 1:
      raise PlanError(f"stage {self.name!r}: unique_blocks={self.unique_blocks} and repeats={self.repeats} must be >= 1")
    if self.inject and self.order != "cycle":
      raise PlanError(f"stage {self.name!r}: input injection needs cycle order (got {self.order!r})")

  @property
  def depth(self) -> int:
    return self.unique_blocks * self.repeats

  def block_and_repeat(self, slot: int) -> tuple[int, int]:
    """Unique block index and repeat index of the stage's `slot`-th effective layer."""
    k = self.unique_blocks
    if self.order == "cycle":
      return slot % k, slot // k
    return slot // self.repeats, slot % self.repeats

  # Per-depth arrays [U*C, ...] in effective-layer order, folded for the two
  # nested scans (outer, inner): cycle runs [C, U], sequence [U, C]. Arrays
  # only need .reshape / .swapaxes (numpy or JAX).
  @property
  def fold_shape(self) -> tuple[int, int]:
    return (self.repeats, self.unique_blocks) if self.order == "cycle" else (self.unique_blocks, self.repeats)

  def fold(self, x):
    """[U*C, ...] -> [outer, inner, ...] (see fold_shape)."""
    return x.reshape(self.fold_shape + tuple(x.shape[1:]))

  @staticmethod
  def unfold(x):
    """[outer, inner, ...] -> [outer * inner, ...] (inverse of fold)."""
    return x.reshape((x.shape[0] * x.shape[1],) + tuple(x.shape[2:]))

  def ends_loop(self, block: int, repeat: int) -> bool:
    """Whether the effective layer (block, repeat) closes a loop of this stage
    that another loop follows (a loop boundary: cycle order, repeated)."""
    return self.order == "cycle" and block == self.unique_blocks - 1 and repeat < self.repeats - 1

  def per_block(self, x):
    """[U*C, ...] per-depth values -> [U, C, ...] (unique block, repeat)."""
    x = self.fold(x)
    return x.swapaxes(0, 1) if self.order == "cycle" else x


class Layer(NamedTuple):
  """One effective layer of a plan."""
  depth: int  # effective layer index in the whole model
  stage: int  # stage index
  block: int  # unique block index within the stage
  repeat: int  # repeat index within the stage
  slot: int  # index along the stage's per-depth axis (LoRA, per-depth norms)
  kv_slot: int  # entry of the KV store this layer attends to (0 .. Plan.kv_slots - 1)
  kv_write: bool  # True: this layer computes the K/V of kv_slot; False: it reads them
  rope: int  # rotary table kind: 0 global, 1 local (sliding-window layers)
  window: int | None  # sliding window (0: unlimited); None when the model has no windows


class Loop(NamedTuple):
  """The plan's loop: its one repeated stage, described once. Every feature
  that works loop by loop (exits, depth-wise batching, self-speculation,
  Mixture-of-Recursions, test-time loop counts, per-loop losses) reads this
  record (`Plan.loop`) instead of searching the stages itself.

  A loop is one pass over the stage's U unique blocks (cycle order), so loop
  j (0-based) is the effective layers first + j * U .. first + (j + 1) * U - 1."""
  stage: int  # index of the repeated stage in Plan.stages
  unique_blocks: int  # U: effective layers per loop
  repeats: int  # C: loops the plan runs
  order: str  # "cycle" (1-2-3 1-2-3) or "sequence" (1-1 2-2 3-3: no loop boundaries inside the stage)
  first: int  # effective depth of the stage's first layer
  inject: bool  # a recurrent core: the prelude output is injected at every loop start; the count may change
  routed: bool  # Mixture-of-Recursions routers choose each token's loops (model.mor)

  @property
  def boundaries(self) -> tuple[int, ...]:
    """Effective depths after which a loop ends and another follows (where an
    exit is decided and a loop state is read out); () in sequence order."""
    if self.order != "cycle":
      return ()
    return tuple(self.first + (j + 1) * self.unique_blocks - 1 for j in range(self.repeats - 1))

  @property
  def last(self) -> int:
    """Effective depth of the stage's last layer."""
    return self.first + self.unique_blocks * self.repeats - 1


@dataclasses.dataclass(frozen=True)
class Plan:
  stages: tuple[Stage, ...]
  kv_sharing: str = "none"
  sliding_window: int = 0
  global_every: int = 0
  routed: bool = False  # Mixture-of-Recursions routers act on the loop (model.mor.routing != 'none')
  _layers: tuple[Layer, ...] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):  # every record is computed (and every sharing rule checked) once, here
    object.__setattr__(self, "_layers", tuple(_records(self)))

  @property
  def depth(self) -> int:
    return sum(s.depth for s in self.stages)

  @property
  def unique_blocks(self) -> int:
    return sum(s.unique_blocks for s in self.stages)

  @property
  def kv_slots(self) -> int:
    """Distinct entries of the KV store (= effective depth without sharing)."""
    return 1 + max(l.kv_slot for l in self._layers)

  def layers(self) -> list[Layer]:
    return list(self._layers)

  @property
  def looped(self) -> Loop | None:
    """The loop record, or None for a plan whose stages all run once (or that
    repeats more than one stage: no preset does; `loop` names it)."""
    repeated = [i for i, s in enumerate(self.stages) if s.repeats > 1 or s.inject]
    if len(repeated) != 1:
      return None
    i = repeated[0]
    s = self.stages[i]
    first = sum(t.depth for t in self.stages[:i])
    return Loop(i, s.unique_blocks, s.repeats, s.order, first, s.inject, self.routed)

  @property
  def recurrent(self) -> bool:
    """Whether the loop is a recurrent core (input injection; a loop count may change at run time)."""
    return self.looped is not None and self.looped.inject

  def loop(self, use: str, cycle: bool = True) -> Loop:
    """The loop record for a feature that needs one; `use` names the feature
    (an option, e.g. "exit='confidence:0.9'") in the one error wording: the
    plan must repeat exactly one stage and, with `cycle`, in cycle order."""
    loop = self.looped
    stages = [(s.name, s.unique_blocks, s.repeats, s.order) for s in self.stages]
    if loop is None:
      n = sum(s.repeats > 1 for s in self.stages)
      raise PlanError(f"{use} needs a plan with exactly one repeated stage (the loop); this plan has {n} (stages "
                      f"{stages} as (name, unique blocks, repeats, order))")
    if cycle and loop.order != "cycle":
      raise PlanError(f"{use} needs the loop {self.stages[loop.stage].name!r} in cycle order (1-2-3 1-2-3), "
                      f"not {loop.order!r}")
    return loop

  def stage_layers(self, i: int) -> list[Layer]:
    return [l for l in self._layers if l.stage == i]

  def loop_layers(self, i: int, loops: int) -> list[Layer]:
    """The records of cycle-order stage i run `loops` times instead of its
    repeats C (the recurrent core at a test-time loop count): iteration j is
    repeat min(j, C - 1)'s records (block, per-depth slot, rotary kind,
    window), with repeat j. Record n of the list owns entry n of a KV cache
    built for `loops` iterations (`Transformer.init_cache(loops=...)`)."""
    spec, layers = self.stages[i], self.stage_layers(i)
    if spec.order != "cycle":
      raise PlanError(f"stage {spec.name!r}: a loop count needs cycle order (got {spec.order!r})")
    u, first = spec.unique_blocks, layers[0].depth
    return [layers[min(j, spec.repeats - 1) * u + b]._replace(depth=first + j * u + b, repeat=j)
            for j in range(loops) for b in range(u)]

  def split(self, x) -> list:
    """[L_eff, ...] per-effective-layer values -> per stage [U*C, ...]."""
    out, start = [], 0
    for s in self.stages:
      out.append(x[start:start + s.depth])
      start += s.depth
    return out

  def block_writes_kv(self, stage: int, block: int) -> bool:
    """Whether unique block `block` of `stage` computes K/V at any of its depths
    (it then owns K/V projections; a block that only reads has none)."""
    return any(l.kv_write for l in self._layers if l.stage == stage and l.block == block)

  def describe(self) -> list[dict]:
    return [{"depth": l.depth, "stage": self.stages[l.stage].name, "block": l.block, "repeat": l.repeat,
             "kv_slot": l.kv_slot} for l in self._layers]


# ----------------------------------------------------------------------------
# Layer kinds and the KV-slot map.


def _kinds(depth: int, sliding_window: int, global_every: int) -> tuple[int, int | None]:
  """(rotary kind, window) of effective layer `depth`: with sliding windows,
  layer l is global when (l + 1) % global_every == 0 and local otherwise; the
  kind follows the depth, not the unique block."""
  if not sliding_window:
    return 0, None
  is_global = global_every > 0 and (depth + 1) % global_every == 0
  return (0, 0) if is_global else (1, sliding_window)


def kv_sources(plan: Plan) -> list[int]:
  """Per effective layer, the depth of the layer whose K/V it attends to
  (itself when it computes its own), under plan.kv_sharing:

    none       every layer its own K/V
    cla:s      cross-layer attention: in each group of s adjacent layers the
               lowest computes K/V and the others read them
    mlkv:n     n KV layers spread evenly over the depth (layer floor(i L / n),
               i < n); each layer reads the nearest KV layer at or below it
    recursion  later repeats of a shared block read the K/V its first repeat
               wrote (Mixture-of-Recursions' recursive KV sharing)
  """
  field = f"model.kv_sharing={plan.kv_sharing!r}"
  mode, _, arg = plan.kv_sharing.partition(":")
  depth = plan.depth
  if mode == "none" and not arg:
    return list(range(depth))
  if mode in ("cla", "mlkv"):
    try:
      n = int(arg)
    except ValueError:
      raise PlanError(f"{field}: '{mode}:' needs an integer (e.g. '{mode}:2')") from None
    if mode == "cla":
      if n < 1 or depth % n:
        raise PlanError(f"{field}: group size {n} must be >= 1 and divide the effective depth {depth}")
      return [l - l % n for l in range(depth)]
    if not 1 <= n <= depth:
      raise PlanError(f"{field}: {n} KV layers must be in [1, effective depth {depth}]")
    writers = [i * depth // n for i in range(n)]
    return [max(w for w in writers if w <= l) for l in range(depth)]
  if mode == "recursion" and not arg:
    if all(s.repeats == 1 for s in plan.stages):
      raise PlanError(f"{field}: no stage of the plan repeats a block ({[(s.name, s.repeats) for s in plan.stages]} "
                      "(stage, repeats)), so there is no later recursion to share with")
    first, out, start = {}, [], 0
    for i, s in enumerate(plan.stages):
      for slot in range(s.depth):
        k, _ = s.block_and_repeat(slot)
        out.append(first.setdefault((i, k), start + slot))
      start += s.depth
    return out
  raise PlanError(f"{field} is not one of {list(KV_SHARING)}")


def _records(plan: Plan) -> list[Layer]:
  kinds = [_kinds(d, plan.sliding_window, plan.global_every) for d in range(plan.depth)]
  src = kv_sources(plan)
  writers = sorted(set(src))
  for l, w in enumerate(src):
    if kinds[l][0] != kinds[w][0]:
      names = ("global", "local")
      raise PlanError(f"model.kv_sharing={plan.kv_sharing!r}: layer {l} ({names[kinds[l][0]]} rotary) would read "
                      f"the K/V of layer {w} ({names[kinds[w][0]]} rotary), rotated with another base; choose "
                      f"model.global_every={plan.global_every} and the sharing so that a group has one kind")
  out, depth = [], 0
  for i, s in enumerate(plan.stages):
    for slot in range(s.depth):
      k, r = s.block_and_repeat(slot)
      out.append(Layer(depth, i, k, r, slot, writers.index(src[depth]), src[depth] == depth, *kinds[depth]))
      depth += 1
  return out


# ----------------------------------------------------------------------------
# Presets: one registry. Adding a preset is one entry here.


@dataclasses.dataclass(frozen=True)
class Preset:
  # (num_layers, repeats, per_depth_norms, (prelude, coda)) -> stages; the ends are read by `recurrent` only.
  stages: Callable[[int, int, bool, tuple[int, int]], tuple[Stage, ...]]
  uses_repeats: bool  # whether model.plan.repeats is read (looped / sandwich repeat their block L or L-2 times)
  # The stage test-time loop counts change (None: nothing repeats); with_repeats reads it
  # because a preset's loop may repeat only once (looped / sandwich at their smallest depth).
  loop_stage: str | None
  min_layers: int = 1


def _divide(total: int, repeats: int, what: str) -> int:
  if total % repeats:
    raise PlanError(f"model.plan: {what}={total} is not divisible by model.plan.repeats={repeats}")
  return total // repeats


def _middle(order: str):
  def stages(L, R, norms, ends):
    return (Stage("first", 1, 1), Stage("middle", _divide(L - 2, R, "num_layers - 2"), R, order, norms),
            Stage("last", 1, 1))
  return stages


def _recurrent(L, R, norms, ends):
  """Huginn's prelude / core / coda: P unique blocks once, U core blocks looped
  R times in cycle order (the loop count; it may change at run time, see
  `recursive_lm.model.recursion.run_recurrent`), Q unique blocks once, with
  U = (L - P - Q) / R."""
  prelude, coda = ends
  if prelude < 1 or coda < 1:
    raise PlanError(f"model.plan: prelude={prelude} and coda={coda} must be >= 1 for preset 'recurrent'")
  if L - prelude - coda < R:
    raise PlanError(f"model.plan: preset 'recurrent' needs num_layers >= prelude + repeats + coda = "
                    f"{prelude + R + coda} (got num_layers={L})")
  core = _divide(L - prelude - coda, R, "num_layers - prelude - coda")
  return Stage("prelude", prelude, 1), Stage("core", core, R, "cycle", norms, inject=True), Stage("coda", coda, 1)


PRESETS: dict[str, Preset] = {
    "vanilla": Preset(lambda L, R, n, e: (Stage("main", L, 1),), False, None),
    "looped": Preset(lambda L, R, n, e: (Stage("main", 1, L, "cycle", n),), False, "main"),
    "cycle": Preset(lambda L, R, n, e: (Stage("main", _divide(L, R, "num_layers"), R, "cycle", n),), True, "main"),
    "sequence": Preset(lambda L, R, n, e: (Stage("main", _divide(L, R, "num_layers"), R, "sequence", n),), True,
                       "main"),
    "middle_cycle": Preset(_middle("cycle"), True, "middle", 3),
    "middle_sequence": Preset(_middle("sequence"), True, "middle", 3),
    "sandwich": Preset(lambda L, R, n, e: (Stage("first", 1, 1), Stage("middle", 1, L - 2, "cycle", n),
                                           Stage("last", 1, 1)), False, "middle", 3),
    "recurrent": Preset(_recurrent, True, "core", 3),
}
PRESET_NAMES = tuple(PRESETS)


def _preset(name: str) -> Preset:
  if name not in PRESETS:
    raise PlanError(f"model.plan.preset={name!r} is unknown (one of {list(PRESETS)})")
  return PRESETS[name]


def build(preset: str, num_layers: int, repeats: int = 1, per_depth_norms: bool = False, kv_sharing: str = "none",
          sliding_window: int = 0, global_every: int = 0, ends: tuple[int, int] = (2, 2), routed: bool = False) -> Plan:
  """Plan for a named preset with `num_layers` effective layers. ends:
  (prelude, coda) unique blocks of the `recurrent` preset (ignored by the others)."""
  L, R = num_layers, repeats
  p = _preset(preset)
  if L < 1 or R < 1:
    raise PlanError(f"model.plan: num_layers={L} and repeats={R} must be >= 1")
  if L < p.min_layers:
    raise PlanError(f"model.plan: preset {preset!r} needs num_layers >= {p.min_layers} (got {L}): first and last "
                    "stay unique")
  return Plan(p.stages(L, R, per_depth_norms, tuple(ends)), kv_sharing, sliding_window, global_every, routed)


def from_config(cfg) -> Plan:
  """Plan of a `recursive_lm.config.ModelConfig` (its plan, KV sharing and layer kinds)."""
  p = cfg.plan
  return build(p.preset, p.num_layers, p.repeats, p.per_depth_norms, cfg.kv_sharing, cfg.sliding_window,
               cfg.global_every, (p.prelude, p.coda), cfg.mor.routing != "none")


def with_repeats(preset: str, num_layers: int, repeats: int, loops: int,
                 ends: tuple[int, int] = (2, 2)) -> tuple[int, int]:
  """(num_layers, repeats) of the same preset with its shared stage run `loops`
  times over the same unique blocks (test-time loop counts; compile-time
  benchmarks). Raises PlanError for a preset with nothing to loop."""
  p = _preset(preset)
  if p.loop_stage is None:
    raise PlanError(f"model.plan.preset={preset!r} has no shared stage to loop")
  if loops < 1:
    raise PlanError(f"loops={loops} must be >= 1")
  plan = build(preset, num_layers, repeats, ends=ends)
  stage = next(s for s in plan.stages if s.name == p.loop_stage)
  new_layers = plan.depth - stage.depth + stage.unique_blocks * loops
  new_repeats = loops if p.uses_repeats else repeats
  build(preset, new_layers, new_repeats, ends=ends)
  return new_layers, new_repeats
