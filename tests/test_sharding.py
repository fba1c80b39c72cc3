"""Sharding: mesh-shape resolution and its errors, the PartitionSpecs each
preset gives, activation constraints, mixed precision, and the key property:
training on a 2x2x2 (data, fsdp, tensor) mesh of 8 devices gives the losses
of training on one device.

conftest provides 8 simulated CPU devices and turns Flax eager sharding off.
"""

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm import optim, sharding
from recursive_lm.config import ConfigError, MeshConfig
from recursive_lm.model.transformer import Transformer
from recursive_lm.train_step import make_train_step


def mesh_cfg(data=-1, fsdp=1, tensor=1, expert=1, rules="fsdp") -> MeshConfig:
  return MeshConfig(data=data, fsdp=fsdp, tensor=tensor, expert=expert, rules=rules, distributed=False)


def one_line(err) -> str:
  msg = str(err.value)
  assert "\n" not in msg, msg
  return msg


# ----------------------------------------------------------------------------
# (a) Mesh shapes and configuration errors.


@pytest.mark.parametrize("sizes, want", [
    (dict(data=-1), (8, 1, 1, 1)),
    (dict(data=-1, fsdp=2, tensor=2), (2, 2, 2, 1)),
    (dict(data=2, fsdp=-1, tensor=2), (2, 2, 2, 1)),
    (dict(data=1, fsdp=2, tensor=2, expert=-1), (1, 2, 2, 2)),
    (dict(data=2, fsdp=2, tensor=2), (2, 2, 2, 1)),
])
def test_mesh_shape_resolves(sizes, want):
  assert sharding.mesh_shape(mesh_cfg(**sizes), 8) == want


def test_mesh_shape_product_mismatch_names_axes_and_numbers():
  with pytest.raises(ConfigError) as e:
    sharding.mesh_shape(mesh_cfg(data=3, fsdp=2), 8)
  msg = one_line(e)
  assert "'data': 3" in msg and "'fsdp': 2" in msg and "6 devices" in msg and "8" in msg


def test_mesh_shape_rest_not_divisible():
  with pytest.raises(ConfigError) as e:
    sharding.mesh_shape(mesh_cfg(data=-1, fsdp=3), 8)
  msg = one_line(e)
  assert "'fsdp': 3" in msg and "8 devices" in msg


def test_config_rejects_two_rests_and_zero_sizes():
  c = tiny_config(**{"mesh.data": -1, "mesh.fsdp": -1})
  with pytest.raises(ConfigError, match="at most one"):
    config_lib.load(c)
  with pytest.raises(ConfigError, match=r"mesh\.tensor=0"):
    config_lib.load(tiny_config(**{"mesh.tensor": 0}))


@pytest.mark.devices(8)
def test_make_mesh_is_auto_and_takes_devices():
  mesh = sharding.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  one = sharding.make_mesh(mesh_cfg(), devices=jax.devices()[:1])
  assert one.size == 1 and list(one.devices.flat) == jax.devices()[:1]


@pytest.mark.devices(8)
def test_batch_not_divisible_by_data_parallel_size():
  mesh = sharding.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
  sharding.check_batch(8, mesh, "fsdp_tensor")
  sharding.check_batch(6, mesh, "replicated")  # rows are not split
  with pytest.raises(ConfigError) as e:
    sharding.check_batch(6, mesh, "fsdp_tensor")
  msg = one_line(e)
  assert "data.batch_size=6" in msg and "data-parallel size 4" in msg


@pytest.mark.devices(8)
def test_train_run_rejects_batch_before_any_work(tmp_path):
  from recursive_lm import train
  c = tiny_config(**{"data.batch_size": 6, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  with pytest.raises(ConfigError, match="data.batch_size=6"):
    train.run(config_lib.load(c), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.devices(8)
def test_weight_not_divisible_names_parameter_axis_and_numbers():
  cfg = config_lib.load(tiny_config())  # d_model 42
  mesh = sharding.make_mesh(mesh_cfg(data=2, fsdp=4))
  with pytest.raises(ConfigError) as e:
    sharding.create_sharded(lambda: Transformer(cfg.model, nnx.Rngs(0)), mesh, "fsdp")
  msg = one_line(e)
  assert "parameter embed.table" in msg and "'embed'" in msg and "42" in msg and "'fsdp'" in msg and "4" in msg
  # vocab 61 over tensor=2 (the table is checked first; vocab is its first dim)
  mesh = sharding.make_mesh(mesh_cfg(data=4, tensor=2))
  with pytest.raises(ConfigError) as e:
    sharding.create_sharded(lambda: Transformer(cfg.model, nnx.Rngs(0)), mesh, "fsdp_tensor")
  msg = one_line(e)
  assert "parameter embed.table" in msg and "'vocab'" in msg and "61" in msg and "'tensor'" in msg


def test_rules_list_every_logical_axis():
  for preset in sharding.PRESETS:
    names = [name for name, _ in sharding.rules(preset)]
    assert sorted(names) == sorted(set(names))
    assert set(names) >= {"batch", "embed", "heads", "mlp", "vocab", "layers", "lora_rank"}


# ----------------------------------------------------------------------------
# (b) PartitionSpecs per preset, and arrays created on their shards.

D, H, F, V = 32, 2, 64, 256


def small_model_config(**extra):
  over = {"model.vocab_size": V, "model.d_model": D, "model.num_heads": H, "model.num_kv_heads": H,
          "model.mlp_dim": F, "preset": "cycle", "num_layers": 4, "repeats": 2, "lora_rank": 2}
  over.update(extra)
  return config_lib.load(tiny_config(**over))


# (parameter path, shape, spec under fsdp / fsdp_tensor); K=2 unique blocks, K*R=4 slots.
# Under 'replicated' and 'data' every parameter is whole on every device.
F_, T_ = "fsdp", "tensor"
EXPECTED = {
    ("embed", "table"): ((V, D), P(None, F_), P(T_, F_)),
    ("stages", 0, "blocks", "attn", "q", "kernel"): ((2, D, H * (D // H)), P(None, F_, None), P(None, F_, T_)),
    ("stages", 0, "blocks", "attn", "o", "kernel"): ((2, D, D), P(None, None, F_), P(None, T_, F_)),
    ("stages", 0, "blocks", "mlp", "down", "kernel"): ((2, F, D), P(None, None, F_), P(None, T_, F_)),
    ("stages", 0, "blocks", "attn_norm", "scale"): ((2, D), P(None, F_), P(None, F_)),
    ("final_norm", "scale"): ((D,), P(F_), P(F_)),
    ("stages", 0, "slots", "lora", "up", "a"): ((4, D, 2), P(None, F_, None), P(None, F_, None)),
    ("stages", 0, "slots", "lora", "up", "b"): ((4, 2, F), P(None, None, None), P(None, None, T_)),
}


def _norm_spec(spec: P, ndim: int) -> P:
  return P(*(tuple(spec) + (None,) * (ndim - len(spec))))


@pytest.mark.devices(8)
@pytest.mark.parametrize("preset", ["replicated", "data", "fsdp", "fsdp_tensor", "fsdp_tensor_expert"])
def test_abstract_specs_per_preset(preset):
  cfg = small_model_config()
  sizes = dict(data=1, fsdp=2, tensor=2, expert=2) if preset == "fsdp_tensor_expert" else dict(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(mesh_cfg(**sizes))
  _, abstract = sharding.abstract_sharded(lambda: Transformer(cfg.model, nnx.Rngs(0)), mesh, preset)
  flat = dict(nnx.to_flat_state(abstract))
  for path, (shape, fsdp_spec, fsdp_tensor_spec) in EXPECTED.items():
    leaf = flat[path]
    leaf = leaf.get_value() if hasattr(leaf, "get_value") else leaf
    assert leaf.shape == shape, path
    want = {"fsdp": fsdp_spec, "fsdp_tensor": fsdp_tensor_spec,
            "fsdp_tensor_expert": fsdp_tensor_spec}.get(preset, P())  # dense model: no expert axis in use
    got = _norm_spec(leaf.sharding.spec, len(shape))
    assert got == _norm_spec(want, len(shape)), (path, got)
  if preset in ("replicated", "data"):
    for path, leaf in flat.items():
      leaf = leaf.get_value() if hasattr(leaf, "get_value") else leaf
      assert all(a is None for a in leaf.sharding.spec), path


@pytest.mark.devices(8)
def test_create_sharded_places_shards_without_full_copies():
  cfg = small_model_config()
  mesh = sharding.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))

  def init():
    model = Transformer(cfg.model, nnx.Rngs(0))
    tx, _ = optim.make(cfg.optim, 10, nnx.state(model, nnx.Param))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  model, opt = sharding.create_sharded(init, mesh, "fsdp_tensor")
  q = model.stages[0].blocks.attn.q.kernel[...]
  assert q.shape == (2, D, D)
  assert q.sharding.mesh == mesh and _norm_spec(q.sharding.spec, 3) == P(None, "fsdp", "tensor")
  # Every device holds a quarter of q (fsdp x tensor), replicated over data.
  assert {s.data.shape for s in q.addressable_shards} == {(2, D // 2, D // 2)}
  assert len(q.addressable_shards) == 8
  table = model.embed.table[...]
  assert {s.data.shape for s in table.addressable_shards} == {(V // 2, D // 2)}
  # Optimiser moments follow their parameters.
  mu = dict(nnx.to_flat_state(nnx.state(opt)))
  mu_q = [v for p, v in mu.items() if p[-6:] == ("stages", 0, "blocks", "attn", "q", "kernel") and "mu" in p]
  assert mu_q and all(_norm_spec(v[...].sharding.spec, 3) == P(None, "fsdp", "tensor") for v in mu_q)
  # Values agree with an eager, unsharded build (same rngs; jit may round the init's scaling differently).
  ref = Transformer(cfg.model, nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(q), np.asarray(ref.stages[0].blocks.attn.q.kernel[...]), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# Activation constraints: a no-op without a mesh; batch-sharded rows under one.


@pytest.mark.devices(8)
def test_constrain_residual_noop_without_mesh_or_rules():
  x = jnp.ones((8, 4, 6))
  assert sharding.constrain_residual(x) is x
  mesh = sharding.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(mesh):  # a mesh but no logical rules: leave x alone
    assert sharding.constrain_residual(x) is x


@pytest.mark.devices(8)
def test_constrain_residual_shards_rows_only():
  mesh = sharding.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))

  def step(preset):
    # A fresh function per preset: flax's logical rules are not part of jit's cache key.
    return sharding.under_mesh(jax.jit(lambda x: sharding.constrain_residual(x * 2)), mesh, preset)

  x = jnp.ones((8, 4, 6))
  y = step("fsdp_tensor")(x)
  want = jax.sharding.NamedSharding(mesh, P(sharding.DATA_PARALLEL, None, None))
  assert y.sharding.is_equivalent_to(want, 3), y.sharding
  assert {s.data.shape for s in y.addressable_shards} == {(2, 4, 6)}  # rows over data*fsdp, D whole
  y = step("replicated")(x)  # no batch rule: untouched
  assert y.sharding.is_fully_replicated
  odd = step("fsdp_tensor")(jnp.ones((6, 4, 6)))  # 6 rows over 4: untouched
  np.testing.assert_array_equal(np.asarray(odd), 2.0)
  # The generic form maps any logical names through the rules.
  table = sharding.under_mesh(jax.jit(lambda t: sharding.constrain(t + 1, ("vocab", None))), mesh, "fsdp_tensor")(
      jnp.ones((8, 6)))
  assert table.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("tensor", None)), 2)


# ----------------------------------------------------------------------------
# Mixed precision: bfloat16 compute, float32 parameters and loss.


def test_bfloat16_compute_float32_params_and_loss():
  cfg = small_model_config(**{"model.compute_dtype": "bfloat16"})
  model = Transformer(cfg.model, nnx.Rngs(0))
  tx, _ = optim.make(cfg.optim, 10, nnx.state(model, nnx.Param))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, V, (4, 17), dtype=np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
  jaxpr = jax.make_jaxpr(lambda t: model(t)[0])(batch["inputs"])
  assert jaxpr.out_avals[0].dtype == jnp.float32  # logits
  text = str(jaxpr)
  assert "bf16[4,16,32] = dot_general" in text or "bf16[4,16,64] = dot_general" in text, "matmuls not in bfloat16"
  step = make_train_step(graphdef)
  losses = []
  for _ in range(2):
    state, m = step(state, batch)
    losses.append(m["loss"])
  assert all(l.dtype == jnp.float32 and np.isfinite(float(l)) for l in losses)
  params = jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
  assert params and all(p.dtype == jnp.float32 for p in params)
  assert np.isclose(float(losses[0]), math.log(V), rtol=0.1)


# ----------------------------------------------------------------------------
# (c) Sharded training == single-device training.

# One tiny training run, shared with tests/test_multihost.py (which writes the
# same overrides into a config file for the real entry point).
TRAIN_OVERRIDES = {
    "model.vocab_size": V, "model.d_model": D, "model.num_heads": H, "model.num_kv_heads": H, "model.mlp_dim": F,
    "model.max_seq_len": 16, "model.plan.preset": "cycle", "model.plan.num_layers": 4, "model.plan.repeats": 2,
    "model.lora.rank": 2,
    "data.seq_len": 16, "data.batch_size": 8, "data.max_bytes": 50_000, "data.num_threads": 1, "data.prefetch": 2,
    "optim.lr": 1e-2, "optim.warmup_steps": 1,
    "train.steps": 5, "train.log_every": 1, "train.eval_every": 5, "train.eval_batches": 1,
    "train.checkpoint_every": 5, "train.peak_flops": 1e12,
    "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "mesh.rules": "fsdp_tensor",
}


def train_config_dict(**extra):
  c = config_lib.base_config()
  for key, value in {**TRAIN_OVERRIDES, **extra}.items():
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c


def read_metrics(workdir) -> tuple[list[dict], list[dict]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


_REFERENCE: dict = {}


def sharded_reference_run(tmp_root) -> tuple[list[dict], list[dict], float]:
  """The 8-device (data=2, fsdp=2, tensor=2) run, once per pytest process."""
  if "run" not in _REFERENCE:
    from recursive_lm import train
    workdir = os.path.join(str(tmp_root), "sharded")
    t = time.time()
    train.run(config_lib.load(train_config_dict()), workdir)
    _REFERENCE["run"] = (*read_metrics(workdir), time.time() - t)
  return _REFERENCE["run"]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  return sharded_reference_run(tmp_path_factory.mktemp("reference"))


def assert_same_run(train_a, eval_a, train_b, eval_b, rtol=1e-4):
  assert [r["step"] for r in train_a] == [r["step"] for r in train_b] == [1, 2, 3, 4, 5]
  for key in ("loss", "grad_norm", "param_norm", "update_norm", "learning_rate"):
    np.testing.assert_allclose([r[key] for r in train_a], [r[key] for r in train_b], rtol=rtol, err_msg=key)
  np.testing.assert_allclose([r["eval_loss"] for r in eval_a], [r["eval_loss"] for r in eval_b], rtol=rtol)


@pytest.mark.devices(8)
def test_sharded_training_matches_single_device(reference_run, tmp_path):
  from recursive_lm import train
  sharded_train, sharded_eval, _ = reference_run
  cfg = config_lib.load(train_config_dict(**{"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1}))
  train.run(cfg, str(tmp_path / "single"), devices=jax.devices()[:1])
  single_train, single_eval = read_metrics(tmp_path / "single")
  assert_same_run(sharded_train, sharded_eval, single_train, single_eval)
  losses = [r["loss"] for r in single_train]
  assert losses[-1] < losses[0]  # it trained (so agreement is not trivial)
