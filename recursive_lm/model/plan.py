"""The depth plan: parameter sharing across depth as plain data.

A model's depth is a list of stages. A stage holds K unique blocks applied R
times, in `cycle` order (1-2-3 1-2-3) or `sequence` order (1-1 2-2 3-3), so
it contributes K * R effective layers. Per-depth parameters (LoRA factors,
per-depth norms) and per-depth state (KV cache) of a stage are stored along
one leading axis in effective-layer order; `Layer.slot` indexes it.

No JAX here: plans are checked and tested as ordinary Python values.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from recursive_lm.config import ConfigError

ORDERS = ("cycle", "sequence")


class PlanError(ConfigError):
  """A plan that does not fit the requested depth; the message names the numbers."""


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  unique_blocks: int  # K
  repeats: int  # R
  order: str = "cycle"
  per_depth_norms: bool = False  # only meaningful when the stage repeats

  def __post_init__(self):
    if self.order not in ORDERS:
      raise PlanError(f"stage {self.name!r}: order={self.order!r} is not one of {ORDERS}")
    if self.unique_blocks < 1 or self.repeats < 1:
      raise PlanError(f"stage {self.name!r}: unique_blocks={self.unique_blocks} and repeats={self.repeats} must be >= 1")

  @property
  def depth(self) -> int:
    return self.unique_blocks * self.repeats

  def block_and_repeat(self, slot: int) -> tuple[int, int]:
    """Unique block index and repeat index of the stage's `slot`-th effective layer."""
    k = self.unique_blocks
    if self.order == "cycle":
      return slot % k, slot // k
    return slot // self.repeats, slot % self.repeats


class Layer(NamedTuple):
  depth: int  # effective layer index in the whole model
  stage: int  # stage index
  block: int  # unique block index within the stage
  repeat: int  # repeat index within the stage
  slot: int  # index along the stage's per-depth axis


@dataclasses.dataclass(frozen=True)
class Plan:
  stages: tuple[Stage, ...]

  @property
  def depth(self) -> int:
    return sum(s.depth for s in self.stages)

  @property
  def unique_blocks(self) -> int:
    return sum(s.unique_blocks for s in self.stages)

  def layers(self) -> list[Layer]:
    out, depth = [], 0
    for i, s in enumerate(self.stages):
      for slot in range(s.depth):
        k, r = s.block_and_repeat(slot)
        out.append(Layer(depth, i, k, r, slot))
        depth += 1
    return out

  def describe(self) -> list[dict]:
    return [{"depth": l.depth, "stage": self.stages[l.stage].name, "block": l.block, "repeat": l.repeat}
            for l in self.layers()]


def _divide(total: int, repeats: int, what: str) -> int:
  if total % repeats:
    raise PlanError(f"model.plan: {what}={total} is not divisible by model.plan.repeats={repeats}")
  return total // repeats


def build(preset: str, num_layers: int, repeats: int = 1, per_depth_norms: bool = False) -> Plan:
  """Plan for a named preset with `num_layers` effective layers."""
  L, R = num_layers, repeats
  if L < 1 or R < 1:
    raise PlanError(f"model.plan: num_layers={L} and repeats={R} must be >= 1")
  if preset == "vanilla":
    return Plan((Stage("main", L, 1),))
  if preset == "looped":
    return Plan((Stage("main", 1, L, "cycle", per_depth_norms),))
  if preset in ("cycle", "sequence"):
    return Plan((Stage("main", _divide(L, R, "num_layers"), R, preset, per_depth_norms),))
  if preset in ("middle_cycle", "middle_sequence", "sandwich"):
    if L < 3:
      raise PlanError(f"model.plan: preset {preset!r} needs num_layers >= 3 (got {L}): first and last stay unique")
    if preset == "sandwich":
      middle = Stage("middle", 1, L - 2, "cycle", per_depth_norms)
    else:
      middle = Stage("middle", _divide(L - 2, R, "num_layers - 2"), R, preset.split("_")[1], per_depth_norms)
    return Plan((Stage("first", 1, 1), middle, Stage("last", 1, 1)))
  raise PlanError(f"model.plan.preset={preset!r} is unknown")


def from_config(cfg) -> Plan:
  """Plan from a `recursive_lm.config.PlanConfig`."""
  return build(cfg.preset, cfg.num_layers, cfg.repeats, cfg.per_depth_norms)
