"""The packed CPU matmul (recursive_lm.model.native) against x @ W, and a
packed decode copy (`layer_weights.packed_copy`) against the model it copies:
the same logits, the same greedy tokens through `generate`, the Engine and
the generate CLI."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from recursive_lm import cli
from recursive_lm import config as config_lib
from recursive_lm.config import ConfigError
from recursive_lm.inference import generate, layer_weights
from recursive_lm.inference.engine import Engine
from recursive_lm.model import native
from recursive_lm.model.layers import Dense
from recursive_lm.model.transformer import Transformer

from test_decode import V, build, full_forward

# Every test that runs the kernel needs a compiler to build it (a machine without one skips them, named).
needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                               reason="no C++ compiler ($CXX, default c++) to build model/packed_matmul.cc")

TIED = dict(preset="cycle", num_layers=4, repeats=2, lora_rank=2, **{
    "model.sliding_window": 4, "model.global_every": 2, "model.rope_base_local": 100.0})


@needs_cxx
@pytest.mark.parametrize("lead,k,n", [((1,), 7, 5), ((3,), 13, 37), ((8,), 64, 96), ((9,), 40, 64),
                                      ((17,), 33, 70), ((2, 3), 16, 33), ((0,), 4, 4)])
def test_packed_matmul_equals_x_times_w(lead, k, n):
  # Column tails (n not a multiple of 32), more than 8 rows (blocks of 8 over a tile), leading axes, no rows.
  rng = np.random.default_rng(k * n)
  x = rng.standard_normal((*lead, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  p = native.pack(w)
  assert p.shape == (-(-n // 32), k, 32)
  np.testing.assert_array_equal(native.unpack(p, n), w)
  y = jax.jit(native.packed_matmul, static_argnums=2)(jnp.asarray(x), p, n)
  assert y.shape == (*lead, n)
  np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)


@needs_cxx
def test_pack_keeps_leading_axes_and_checks_its_inputs():
  w = np.arange(2 * 3 * 40, dtype=np.float32).reshape(2, 3, 40)  # stacked layers [U, K, N]
  p = native.pack(w)
  assert p.shape == (2, 2, 3, 32)
  np.testing.assert_array_equal(native.unpack(p, 40), w)
  with pytest.raises(ValueError, match="float32"):
    native.pack(w.astype(np.float16))
  with pytest.raises(ValueError, match=r"do not hold a \[3, 70\] weight"):
    native.packed_matmul(jnp.ones((1, 3)), p[0], 70)


def test_a_missing_compiler_is_named(tmp_path, monkeypatch):
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  with pytest.raises(ConfigError, match="'no-such-compiler-here' not found"):
    native.build(str(tmp_path))


@needs_cxx
def test_the_build_is_cached_and_leaves_no_partial_file(tmp_path):
  lib = native.build(str(tmp_path))
  assert native.build(str(tmp_path)) == lib
  assert os.listdir(lib.parent) == [lib.name]


@needs_cxx
@pytest.mark.parametrize("tie", [True, False])
def test_packed_copy_gives_the_models_logits(tie):
  model = build(**TIED, **{"model.tie_embeddings": tie})
  before = nnx.state(model)
  copy = layer_weights.packed_copy(model)
  assert layer_weights.packed_copy(model) is copy  # kept while the model's arrays are
  dense = [m for _, m in nnx.iter_modules(copy) if isinstance(m, Dense)]
  assert dense and all(isinstance(m.matmul, layer_weights.PackedLinear) and m.kernel[...].shape[-1] == 32
                       for m in dense)
  assert (copy.embed.readout is not None) == tie
  # The model itself is untouched.
  assert all(a is b for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(before)))
  assert model.embed.readout is None and not any(isinstance(m.matmul, layer_weights.PackedLinear)
                                                 for _, m in nnx.iter_modules(model) if isinstance(m, Dense))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, V, dtype=jnp.int32)
  np.testing.assert_allclose(full_forward(copy, tokens), full_forward(model, tokens), rtol=2e-5, atol=2e-5)


@needs_cxx
def test_generate_and_engine_with_native_matmul_give_the_xla_tokens():
  model = build(**TIED)
  prompts = jax.random.randint(jax.random.key(1), (3, 5), 0, V, dtype=jnp.int32)
  lengths = [5, 2, 4]
  want = np.asarray(generate(model, prompts, 7, prompt_lengths=lengths))
  np.testing.assert_array_equal(generate(model, prompts, 7, prompt_lengths=lengths, matmul="native"), want)
  rows = [np.asarray(prompts[i, :n]) for i, n in enumerate(lengths)]
  outs = Engine(model, slots=2, buckets=(4, 8), matmul="native").generate(rows, max_new_tokens=7)
  for i, c in enumerate(outs):
    np.testing.assert_array_equal(c.tokens, want[i, lengths[i]:lengths[i] + 7])


def test_native_matmul_refuses_what_it_cannot_compute():
  with pytest.raises(ValueError, match="matmul='blas' must be one of"):
    generate(build(**TIED), jnp.zeros((1, 2), jnp.int32), 2, matmul="blas")
  cfg = config_lib.load(tiny_config(**{"model.compute_dtype": "bfloat16"}))
  with pytest.raises(ValueError, match="computes in float32: model.compute_dtype='bfloat16'"):
    layer_weights.decode_model(Transformer(cfg.model, nnx.Rngs(0)), "native")
  with pytest.raises(ConfigError, match="^--matmul=native: matmul='native' computes in float32"):  # the CLIs' line
    cli.packed_for_decode(Transformer(cfg.model, nnx.Rngs(0)), "native")



@needs_cxx
@pytest.mark.parametrize("mode", ["exit", "depthwise", "speculate"])
def test_every_engine_path_runs_the_packed_copy(mode):
  # Exits forced by position (deterministic), depth-wise batching, self-speculation: the tokens (and exit
  # loops) of XLA's dot with the packed weights.
  from test_depthwise import WINDOWED, ExitByPosition, _prompts
  model = build(**WINDOWED)
  kw = {"exit": dict(exit=ExitByPosition()), "depthwise": dict(exit=ExitByPosition(), depthwise=True),
        "speculate": dict(speculate=2)}[mode]
  prompts = _prompts([2, 7, 4, 5], seed=3)
  runs = {m: Engine(model, slots=2, chunk=2, matmul=m, **kw).generate(prompts, max_new_tokens=6)
          for m in ("xla", "native")}
  for a, b in zip(runs["xla"], runs["native"]):
    assert a.tokens == b.tokens and a.exit_loops == b.exit_loops


@needs_cxx
def test_a_model_on_several_devices_is_gathered_onto_one():
  from jax.sharding import NamedSharding, PartitionSpec
  model = build(**TIED)
  prompt = jax.random.randint(jax.random.key(2), (2, 4), 0, V, dtype=jnp.int32)
  want = np.asarray(generate(model, prompt, 5))
  mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, PartitionSpec())))
  assert len(jax.tree.leaves(nnx.state(model))[0].devices()) == len(jax.devices()) > 1
  copy = layer_weights.packed_copy(model)
  assert all(len(leaf.devices()) == 1 for leaf in jax.tree.leaves(nnx.state(copy)))
  np.testing.assert_array_equal(generate(model, prompt, 5, matmul="native"), want)
