"""The depth plan as data: which unique block runs at each effective layer."""

import itertools

import pytest

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm.config import ConfigError
from recursive_lm.model import plan as plan_lib


def layout(plan):
  """[(stage name, block, repeat)] in effective-layer order."""
  return [(plan.stages[l.stage].name, l.block, l.repeat) for l in plan.layers()]


# (preset, num_layers, repeats) -> hand-written (stage, block, repeat) per effective layer.
EXPECTED = {
    ("vanilla", 4, 1): [("main", 0, 0), ("main", 1, 0), ("main", 2, 0), ("main", 3, 0)],
    # looped ignores `repeats`: one block, run num_layers times.
    ("looped", 4, 7): [("main", 0, 0), ("main", 0, 1), ("main", 0, 2), ("main", 0, 3)],
    ("cycle", 6, 2): [("main", 0, 0), ("main", 1, 0), ("main", 2, 0),
                      ("main", 0, 1), ("main", 1, 1), ("main", 2, 1)],
    ("sequence", 6, 2): [("main", 0, 0), ("main", 0, 1), ("main", 1, 0),
                         ("main", 1, 1), ("main", 2, 0), ("main", 2, 1)],
    ("cycle", 6, 3): [("main", 0, 0), ("main", 1, 0), ("main", 0, 1),
                      ("main", 1, 1), ("main", 0, 2), ("main", 1, 2)],
    ("middle_cycle", 8, 3): [("first", 0, 0),
                             ("middle", 0, 0), ("middle", 1, 0), ("middle", 0, 1),
                             ("middle", 1, 1), ("middle", 0, 2), ("middle", 1, 2),
                             ("last", 0, 0)],
    ("middle_sequence", 8, 3): [("first", 0, 0),
                                ("middle", 0, 0), ("middle", 0, 1), ("middle", 0, 2),
                                ("middle", 1, 0), ("middle", 1, 1), ("middle", 1, 2),
                                ("last", 0, 0)],
    ("sandwich", 5, 1): [("first", 0, 0), ("middle", 0, 0), ("middle", 0, 1), ("middle", 0, 2), ("last", 0, 0)],
}


def test_every_preset_has_a_hand_written_map():
  assert {p for p, _, _ in EXPECTED} == set(config_lib.PLAN_PRESETS)


@pytest.mark.parametrize("preset,num_layers,repeats", list(EXPECTED), ids=lambda v: str(v))
def test_block_map_matches_hand_written(preset, num_layers, repeats):
  plan = plan_lib.build(preset, num_layers, repeats)
  assert layout(plan) == EXPECTED[preset, num_layers, repeats]
  # describe() is the JSON-able form of the same map.
  assert [(d["stage"], d["block"], d["repeat"]) for d in plan.describe()] == EXPECTED[preset, num_layers, repeats]
  assert [d["depth"] for d in plan.describe()] == list(range(num_layers))


def test_unique_block_counts():
  assert plan_lib.build("vanilla", 5).unique_blocks == 5
  assert plan_lib.build("looped", 5).unique_blocks == 1
  assert plan_lib.build("cycle", 12, 4).unique_blocks == 3
  assert plan_lib.build("sequence", 12, 3).unique_blocks == 4
  assert plan_lib.build("middle_cycle", 8, 3).unique_blocks == 1 + 2 + 1
  assert plan_lib.build("sandwich", 9).unique_blocks == 3


@pytest.mark.parametrize("preset,num_layers,repeats,numbers", [
    ("cycle", 10, 3, ("10", "3")),
    ("sequence", 10, 4, ("10", "4")),
    ("middle_cycle", 9, 2, ("7", "2")),  # (9 - 2) % 2 != 0
    ("middle_sequence", 10, 3, ("8", "3")),  # (10 - 2) % 3 != 0
])
def test_non_dividing_plan_is_a_config_error(preset, num_layers, repeats, numbers):
  with pytest.raises(ConfigError) as e:
    plan_lib.build(preset, num_layers, repeats)
  msg = str(e.value)
  assert "model.plan" in msg and all(n in msg for n in numbers), msg
  # And through the config loader, which is what users hit.
  with pytest.raises(ConfigError) as e:
    config_lib.load(tiny_config(preset=preset, num_layers=num_layers, repeats=repeats))
  assert "model.plan" in str(e.value) and all(n in str(e.value) for n in numbers)


@pytest.mark.parametrize("preset", ["sandwich", "middle_cycle", "middle_sequence"])
def test_first_last_presets_need_three_layers(preset):
  with pytest.raises(ConfigError, match="model.plan"):
    plan_lib.build(preset, 2, 1)


def test_bad_order_and_sizes_rejected():
  with pytest.raises(ConfigError):
    plan_lib.Stage("s", 2, 2, order="zigzag")
  with pytest.raises(ConfigError):
    plan_lib.build("cycle", 0, 1)
  with pytest.raises(ConfigError):
    plan_lib.build("nope", 4, 1)


@pytest.mark.parametrize("preset", config_lib.PLAN_PRESETS)
def test_effective_depth_preserved(preset):
  """Every valid (L, R) gives exactly L layers, each (stage, slot) once, and each
  unique block runs exactly `repeats` times in its stage."""
  valid = 0
  for num_layers, repeats in itertools.product(range(1, 13), range(1, 7)):
    try:
      plan = plan_lib.build(preset, num_layers, repeats)
    except ConfigError:
      continue
    valid += 1
    layers = plan.layers()
    assert plan.depth == len(layers) == num_layers
    assert [l.depth for l in layers] == list(range(num_layers))
    assert len({(l.stage, l.slot) for l in layers}) == num_layers
    for i, stage in enumerate(plan.stages):
      in_stage = [l for l in layers if l.stage == i]
      assert [l.slot for l in in_stage] == list(range(stage.depth))
      for k in range(stage.unique_blocks):
        assert sorted(l.repeat for l in in_stage if l.block == k) == list(range(stage.repeats))
  assert valid > 0
