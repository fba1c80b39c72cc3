"""Config validation, table-driven: each row is a mistake a user can type in a
config file or a --config.KEY=VALUE override. Every one must fail before
anything is compiled with a ConfigError of one line that names the field and
the offending values.

Most rows go through `config.load` (no JAX at all). The rows that need the
device mesh, the tokenizer or the workdir go through `train.run`, with a
listener on JAX's compile events proving nothing was compiled first.
"""

import os

import jax
import pytest

from recursive_lm import config as config_lib
from recursive_lm.config import ConfigError

import tiny_run


def tiny_cd():
  """A valid tiny config: cycle plan 2 blocks x 2 repeats, LoRA rank 2, d_model 32, 2 heads."""
  return tiny_run.config()


def apply(cd, overrides: dict):
  """Set dotted keys, creating unknown ones the way a config file's typo would (`c.model.dmodel = 32`)."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cd
    for p in parents:
      node = node[p]
    setattr(node, leaf, value)
  return cd


MOE = {"model.block": "moeut", "model.moe.experts": 4, "model.moe.expert_size": 16, "model.moe.top_k": 2,
       "model.moe.att_experts": 2, "model.moe.att_top_k": 1, "model.lora.targets": "q,k"}

# (id, overrides, substrings the one-line message must contain: the field(s) and the values)
CASES = [
    # Depth plans that do not divide.
    ("plan_layers_not_multiple_of_repeats", {"model.plan.num_layers": 5}, ["num_layers", "5", "2"]),
    ("plan_repeats_not_dividing", {"model.plan.repeats": 3}, ["repeats", "3", "4"]),
    ("plan_unknown_preset", {"model.plan.preset": "spiral"}, ["model.plan.preset", "spiral"]),
    ("plan_zero_repeats", {"model.plan.repeats": 0}, ["model.plan.repeats", "0"]),
    ("plan_negative_layers", {"model.plan.num_layers": -4}, ["model.plan.num_layers", "-4"]),
    # Widths and heads.
    ("negative_d_model", {"model.d_model": -32}, ["model.d_model", "-32"]),
    ("zero_vocab", {"model.vocab_size": 0}, ["model.vocab_size", "0"]),
    ("negative_mlp_dim", {"model.mlp_dim": -1}, ["model.mlp_dim", "-1"]),
    ("heads_not_dividing_d_model", {"model.num_heads": 3, "model.num_kv_heads": 3}, ["model.d_model", "32", "3"]),
    ("kv_heads_not_dividing_heads", {"model.num_kv_heads": 3}, ["model.num_kv_heads", "3", "2"]),
    ("zero_kv_heads", {"model.num_kv_heads": 0}, ["model.num_kv_heads", "0"]),
    ("rope_fraction_above_one", {"model.rope_fraction": 1.5}, ["model.rope_fraction", "1.5"]),
    ("rope_fraction_odd_rotary_dims", {"model.rope_fraction": 0.0625}, ["model.rope_fraction", "0.0625", "16"]),
    ("unknown_mlp_type", {"model.mlp_type": "swish"}, ["model.mlp_type", "swish"]),
    ("unknown_norm", {"model.norm": "batch"}, ["model.norm", "batch"]),
    ("unknown_remat", {"model.remat": "sometimes"}, ["model.remat", "sometimes"]),
    ("unknown_dtype", {"model.param_dtype": "float64"}, ["model.param_dtype", "float64"]),
    ("zero_max_seq_len", {"model.max_seq_len": 0}, ["model.max_seq_len", "0"]),
    # LoRA.
    ("lora_rank_above_dimension", {"model.lora.rank": 40}, ["model.lora", "40", "32"]),
    ("lora_negative_rank", {"model.lora.rank": -2}, ["model.lora.rank", "-2"]),
    ("lora_unknown_target", {"model.lora.targets": "q,kk"}, ["model.lora.targets", "kk"]),
    ("lora_ranks_unknown_target", {"model.lora.ranks": "zz=4"}, ["model.lora.ranks", "zz"]),
    ("lora_ranks_not_int", {"model.lora.ranks": "q=abc"}, ["model.lora.ranks", "q=abc"]),
    ("lora_per_target_rank_above_dimension", {"model.lora.ranks": "down=99"}, ["model.lora", "99", "down"]),
    ("lora_rank_for_missing_gate", {"model.mlp_type": "gelu", "model.lora.ranks": "gate=2"},
     ["model.lora", "gate", "mlp_type"]),
    # MoE.
    ("unknown_block", {"model.block": "moe"}, ["model.block", "moe"]),
    ("moe_top_k_above_experts", {**MOE, "model.moe.top_k": 8}, ["model.moe.top_k", "8", "4"]),
    ("moe_att_top_k_above_experts", {**MOE, "model.moe.att_top_k": 3}, ["model.moe.att_top_k", "3", "2"]),
    ("moe_zero_experts", {**MOE, "model.moe.experts": 0}, ["model.moe.experts", "0"]),
    ("moe_block_rows_not_power_of_two", {**MOE, "model.moe.block_rows": 100}, ["model.moe.block_rows", "100"]),
    ("moe_grouped_kv_heads", {**MOE, "model.num_kv_heads": 1}, ["model.num_kv_heads", "1", "model.block"]),
    ("moe_lora_on_expert_projection", {**MOE, "model.lora.targets": "q,up"}, ["model.lora", "up", "moeut"]),
    ("moe_experts_not_dividing_expert_axis",
     {**MOE, "mesh.rules": "fsdp_tensor_expert", "mesh.expert": 3, "mesh.data": 1},
     ["model.moe.experts", "4", "mesh.expert", "3"]),
    # Data.
    ("seq_len_above_model_positions", {"data.seq_len": 128}, ["data.seq_len", "128", "model.max_seq_len", "64"]),
    ("zero_batch", {"data.batch_size": 0}, ["data.batch_size", "0"]),
    ("batch_not_divisible_by_accumulation", {"data.batch_size": 6, "optim.grad_accum": 4},
     ["data.batch_size", "6", "optim.grad_accum", "4"]),
    ("unknown_source", {"data.source": "parquet"}, ["data.source", "parquet"]),
    ("text_source_without_glob", {"data.source": "text"}, ["data.source", "text", "data.glob"]),
    ("tokens_source_without_path", {"data.source": "tokens"}, ["data.source", "tokens", "data.tokens_path"]),
    ("val_fraction_above_one", {"data.val_fraction": 1.5}, ["data.val_fraction", "1.5"]),
    ("negative_max_bytes", {"data.max_bytes": -1}, ["data.max_bytes", "-1"]),
    # Optimiser and schedule.
    ("unknown_schedule", {"optim.schedule": "linear"}, ["optim.schedule", "linear"]),
    ("zero_lr", {"optim.lr": 0.0}, ["optim.lr", "0"]),
    ("negative_warmup", {"optim.warmup_steps": -1}, ["optim.warmup_steps", "-1"]),
    ("final_lr_fraction_above_one", {"optim.final_lr_fraction": 2.0}, ["optim.final_lr_fraction", "2"]),
    ("zero_decay_fraction", {"optim.schedule": "wsd", "optim.decay_fraction": 0.0}, ["optim.decay_fraction", "0"]),
    ("zero_grad_accum", {"optim.grad_accum": 0}, ["optim.grad_accum", "0"]),
    ("adam_b1_not_below_one", {"optim.b1": 1.5}, ["optim.b1", "1.5"]),
    ("adam_b2_negative", {"optim.b2": -0.9}, ["optim.b2", "-0.9"]),
    ("negative_clip_norm", {"optim.clip_norm": -1.0}, ["optim.clip_norm", "-1"]),
    # Train loop.
    ("zero_steps", {"train.steps": 0}, ["train.steps", "0"]),
    ("zero_checkpoint_every", {"train.checkpoint_every": 0}, ["train.checkpoint_every", "0"]),
    ("zero_keep_checkpoints", {"train.keep_checkpoints": 0}, ["train.keep_checkpoints", "0"]),
    ("unknown_on_nonfinite", {"train.on_nonfinite": "ignore"}, ["train.on_nonfinite", "ignore"]),
    ("negative_peak_flops", {"train.peak_flops": -1.0}, ["train.peak_flops", "-1"]),
    # Mesh (shape only; against the devices below).
    ("mesh_zero_axis", {"mesh.data": 0}, ["mesh.data", "0"]),
    ("mesh_two_rest_axes", {"mesh.data": -1, "mesh.fsdp": -1}, ["mesh", "-1", "data", "fsdp"]),
    ("mesh_unknown_rules", {"mesh.rules": "zero3"}, ["mesh.rules", "zero3"]),
    # Unknown keys and bad types (a typo in a config file creates a new key; None or a
    # replaced sub-dict gets past ConfigDict's own type checks).
    ("unknown_key_typo", {"model.dmodel": 32}, ["model.dmodel", "model.d_model"]),
    ("unknown_section", {"trainer": 1}, ["trainer"]),
    ("none_for_int", {"data.batch_size": None}, ["data.batch_size", "None", "int"]),
    ("replaced_subdict_missing_keys", {"model.lora": {"rank": 2}}, ["missing", "model.lora.targets", "model.lora.alpha"]),
]

# Two rows need a value ConfigDict's own checks refuse on a typed field, so they set
# None first (which ConfigDict accepts and then drops the type): exactly what a config
# file doing `m.d_model = None; ...; m.d_model = 32.5` would do.
CASES += [
    ("float_for_int", [("model.d_model", None), ("model.d_model", 32.5)], ["model.d_model", "32.5", "int"]),
    ("bool_for_int", [("model.num_heads", None), ("model.num_heads", True)], ["model.num_heads", "True", "int"]),
    ("str_for_bool", [("model.scan", None), ("model.scan", "no")], ["model.scan", "no", "bool"]),
]


def build(overrides):
  cd = tiny_cd()
  items = overrides.items() if isinstance(overrides, dict) else overrides
  for key, value in items:
    apply(cd, {key: value})
  return cd


def test_table_is_large_enough():
  assert len(CASES) >= 30
  assert len({c[0] for c in CASES}) == len(CASES)


def test_the_base_config_is_valid():
  config_lib.load(tiny_cd())
  config_lib.load(build(MOE))


@pytest.mark.parametrize("overrides,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_config_is_one_line_naming_field_and_values(overrides, needles):
  with pytest.raises(ConfigError) as info:
    config_lib.load(build(overrides))
  message = str(info.value)
  assert "\n" not in message, message
  for needle in needles:
    assert needle in message, (needle, message)


# ---------------------------------------------------------------------------
# Through train.run: the checks that need devices, the tokenizer or the workdir.


@pytest.fixture
def compile_events():
  """XLA compilations started while the test runs (abstract tracing, e.g. eval_shape, is not one)."""
  events = []

  def listener(name, *args, **kwargs):
    if "backend_compile" in name:
      events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)


def test_compile_listener_sees_a_compile(compile_events):
  jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(5))
  assert compile_events


RUN_CASES = [
    # (id, overrides, devices given to the run (8 simulated in this process), needles)
    ("mesh_not_matching_devices", {"mesh.data": 3}, 8, ["mesh", "'data': 3", "3 devices", "8"]),
    ("mesh_fixed_axes_not_dividing_devices", {"mesh.fsdp": 3}, 8, ["mesh", "'fsdp': 3", "8 devices"]),
    ("batch_not_divisible_by_data_parallel", {}, 8, ["data.batch_size=4", "8"]),
    ("micro_batch_not_divisible_by_data_parallel", {"data.batch_size": 8, "optim.grad_accum": 2}, 8,
     ["data.batch_size=8 / optim.grad_accum=2 = 4 rows per micro-batch", "data-parallel size 8"]),
    ("mlp_dim_not_dividing_tensor_axis", {"model.mlp_dim": 60, "data.batch_size": 8, "mesh.data": 1, "mesh.tensor": 8,
                                          "mesh.rules": "fsdp_tensor"}, 8, ["dim 60", "'mlp'", "'tensor'", "8"]),
    ("vocab_smaller_than_tokenizer", {"model.vocab_size": 100}, 1, ["model.vocab_size=100", "256"]),
    ("seq_len_longer_than_the_data", {"data.max_bytes": 300}, 1, ["data.seq_len=32", "data.max_bytes=300"]),
]


@pytest.mark.parametrize("overrides,n_devices,needles",
                         [pytest.param(*c[1:], marks=pytest.mark.devices(c[2])) for c in RUN_CASES],
                         ids=[c[0] for c in RUN_CASES])
def test_invalid_run_fails_before_compiling(overrides, n_devices, needles, tmp_path, compile_events):
  from recursive_lm import train
  cfg = config_lib.load(build(overrides))  # valid on its own; wrong for these devices or this data
  with pytest.raises(ConfigError) as info:
    train.run(cfg, str(tmp_path / "wd"), devices=jax.devices()[:n_devices])
  message = str(info.value)
  assert "\n" not in message, message
  for needle in needles:
    assert needle in message, (needle, message)
  assert compile_events == [], compile_events


def test_resuming_a_workdir_with_another_architecture_is_refused(tmp_path, compile_events):
  from recursive_lm import checkpoint, train
  workdir = str(tmp_path / "wd")
  checkpoint.check_or_write_config(workdir, config_lib.load(tiny_cd()))  # what a first launch leaves
  before = open(os.path.join(workdir, "config.json")).read()
  for overrides, needles in [({"model.plan.repeats": 4, "model.plan.num_layers": 8}, ["model.plan", "repeats"]),
                             ({"model.lora.rank": 4}, ["model.lora", "4", "2"]),
                             ({"model.mlp_type": "gelu", "model.lora.targets": "q,v"}, ["model.", "differing"])]:
    with pytest.raises(ConfigError) as info:
      train.run(config_lib.load(build(overrides)), workdir, devices=jax.devices()[:1])
    message = str(info.value)
    assert "\n" not in message and "different model" in message, message
    for needle in needles:
      assert needle in message, (needle, message)
  assert open(os.path.join(workdir, "config.json")).read() == before
  assert sorted(os.listdir(workdir)) == ["config.json"]
  assert compile_events == [], compile_events
