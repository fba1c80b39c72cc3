"""The depth plan as data: which unique block runs at each effective layer."""

import itertools

import pytest

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm.config import ConfigError
from recursive_lm import plan as plan_lib


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
    # prelude / coda of 2 (build's default ends), core 2 blocks x 2 loops in cycle order.
    ("recurrent", 8, 2): [("prelude", 0, 0), ("prelude", 1, 0),
                          ("core", 0, 0), ("core", 1, 0), ("core", 0, 1), ("core", 1, 1),
                          ("coda", 0, 0), ("coda", 1, 0)],
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


def test_config_imports_nothing_from_model_data_convert():
  """The config and the plan sit at the bottom of the import graph."""
  import subprocess
  import sys
  code = ("import sys, recursive_lm.config, recursive_lm.plan; "
          "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
          "(['recursive_lm', 'model'], ['recursive_lm', 'data'], ['recursive_lm', 'convert'])))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout
  # One floor up: the data layer (every tokenizer spec, GGUF's included) needs no model or converter.
  code = ("import sys, recursive_lm.data, recursive_lm.data.gguf_tokenizer; "
          "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
          "(['recursive_lm', 'model'], ['recursive_lm', 'convert'])))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_presets_come_from_one_registry():
  assert config_lib.PLAN_PRESETS == tuple(plan_lib.PRESETS)


@pytest.mark.parametrize("preset,num_layers,repeats,loops,expected", [
    ("looped", 4, 1, 6, (6, 1)),
    ("cycle", 6, 2, 3, (9, 3)),
    ("sequence", 6, 3, 1, (2, 1)),
    ("middle_cycle", 8, 3, 2, (6, 2)),
    ("middle_sequence", 8, 2, 4, (14, 4)),
    ("sandwich", 5, 1, 7, (9, 1)),
    ("recurrent", 8, 2, 5, (14, 5)),
])
def test_with_repeats_keeps_the_unique_blocks(preset, num_layers, repeats, loops, expected):
  assert plan_lib.with_repeats(preset, num_layers, repeats, loops) == expected
  before, after = plan_lib.build(preset, num_layers, repeats), plan_lib.build(preset, *expected)
  assert [s.unique_blocks for s in before.stages] == [s.unique_blocks for s in after.stages]
  loop = [s for s in after.stages if s.repeats > 1 or s.name in ("main", "middle", "core")]
  assert all(s.repeats == loops for s in loop)


def test_with_repeats_rejects_vanilla():
  with pytest.raises(ConfigError, match="vanilla"):
    plan_lib.with_repeats("vanilla", 4, 1, 2)


@pytest.mark.parametrize("order", ["cycle", "sequence"])
def test_fold_and_per_block_follow_the_layer_records(order):
  import numpy as np
  stage = plan_lib.Stage("s", 3, 2, order)
  depth = np.arange(stage.depth)
  folded = stage.fold(depth)
  assert folded.shape == stage.fold_shape and (plan_lib.Stage.unfold(folded) == depth).all()
  per_block = stage.per_block(depth)  # [K, R]: the slot of (block, repeat)
  for slot in range(stage.depth):
    k, r = stage.block_and_repeat(slot)
    assert per_block[k, r] == slot


# (kv_sharing, preset, num_layers, repeats) -> hand-written kv_slot and writer flag per effective layer.
KV_EXPECTED = {
    ("none", "cycle", 4, 2): ([0, 1, 2, 3], [1, 1, 1, 1]),
    ("cla:2", "vanilla", 6, 1): ([0, 0, 1, 1, 2, 2], [1, 0, 1, 0, 1, 0]),
    ("cla:3", "looped", 6, 1): ([0, 0, 0, 1, 1, 1], [1, 0, 0, 1, 0, 0]),
    ("mlkv:2", "vanilla", 5, 1): ([0, 0, 1, 1, 1], [1, 0, 1, 0, 0]),  # KV layers 0 and 5 // 2 = 2
    ("mlkv:3", "vanilla", 7, 1): ([0, 0, 1, 1, 2, 2, 2], [1, 0, 1, 0, 1, 0, 0]),  # layers 0, 2, 4
    ("mlkv:1", "cycle", 4, 2): ([0, 0, 0, 0], [1, 0, 0, 0]),
    # cycle 1-2-3 1-2-3: repeat 1 of block k reads what repeat 0 of block k wrote.
    ("recursion", "cycle", 6, 2): ([0, 1, 2, 0, 1, 2], [1, 1, 1, 0, 0, 0]),
    ("recursion", "sequence", 6, 3): ([0, 0, 0, 1, 1, 1], [1, 0, 0, 1, 0, 0]),
    # first and last run once and keep their own slots.
    ("recursion", "middle_cycle", 6, 2): ([0, 1, 2, 1, 2, 3], [1, 1, 1, 0, 0, 1]),
}


@pytest.mark.parametrize("key", list(KV_EXPECTED), ids=str)
def test_kv_slots_match_hand_written(key):
  sharing, preset, num_layers, repeats = key
  plan = plan_lib.build(preset, num_layers, repeats, kv_sharing=sharing)
  slots, writes = KV_EXPECTED[key]
  assert [l.kv_slot for l in plan.layers()] == slots
  assert [int(l.kv_write) for l in plan.layers()] == writes
  assert plan.kv_slots == len(set(slots)) == sum(writes)
  assert [d["kv_slot"] for d in plan.describe()] == slots


@pytest.mark.parametrize("preset", config_lib.PLAN_PRESETS)
def test_every_preset_records_every_layer(preset):
  """Layer records of every preset: each layer reads a slot written at or below
  it by a layer of the same rotary kind, with the kinds of the windows."""
  for sharing in ("none", "cla:2", "mlkv:2", "recursion"):
    try:
      plan = plan_lib.build(preset, 6, 2, kv_sharing=sharing, sliding_window=3, global_every=2)
    except ConfigError:
      continue
    layers = plan.layers()
    writer = {l.kv_slot: l for l in layers if l.kv_write}
    assert sorted(writer) == list(range(plan.kv_slots))
    for l in layers:
      assert writer[l.kv_slot].depth <= l.depth and writer[l.kv_slot].rope == l.rope
      assert (l.rope, l.window) == ((0, 0) if (l.depth + 1) % 2 == 0 else (1, 3))


@pytest.mark.parametrize("sharing,preset,layers,numbers", [
    ("cla:3", "vanilla", 4, ("cla:3", "3", "4")),
    ("mlkv:5", "vanilla", 4, ("mlkv:5", "5", "4")),
    ("mlkv:0", "vanilla", 4, ("mlkv:0", "0", "4")),
    ("recursion", "vanilla", 4, ("recursion", "repeats")),
    ("bogus", "vanilla", 4, ("bogus",)),
    ("cla:x", "vanilla", 4, ("cla:x",)),
])
def test_invalid_kv_sharing_is_one_named_line(sharing, preset, layers, numbers):
  c = tiny_config(preset=preset, num_layers=layers, **{"model.kv_sharing": sharing})
  with pytest.raises(ConfigError) as e:
    config_lib.load(c)
  msg = str(e.value)
  assert "model.kv_sharing" in msg and "\n" not in msg and all(n in msg for n in numbers), msg


def test_sharing_across_rotary_kinds_is_rejected():
  # global_every=2: layer 0 local, layer 1 global; CLA-2 would mix them.
  with pytest.raises(ConfigError, match="model.kv_sharing='cla:2': layer 1"):
    plan_lib.build("vanilla", 4, kv_sharing="cla:2", sliding_window=3, global_every=2)
