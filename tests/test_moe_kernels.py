"""The Pallas expert dispatches (recursive_lm.model.dispatch): the megablox
grouped matmul (TPU) run in Pallas interpret mode on CPU against the dense
reference, for sigma-MoE and both SwitchHead projections (values and every
gradient, ragged groups over several row tiles, empty groups, bfloat16
against float32); the Mosaic GPU ragged dot on a GPU only (Mosaic GPU has no
CPU interpret mode); the dispatch choice per backend name and its error lines.
"""

import dataclasses
import functools
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm import config as config_lib
from recursive_lm.config import ConfigError
from recursive_lm.model import dispatch, kernels, moe, switchhead

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, E, S, K = 24, 7, 8, 3  # sigma-MoE: 2 x 12 tokens, 72 assignments in 16-row tiles (cap 16): 5 tiles
H, EA, HD, KA = 3, 4, 8, 2  # SwitchHead: 3 heads of 4 experts each, top-2


def rand(shape, seed, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def sigma_inputs():
  """x [2, 12, D] with a positive router input and a router column of -10: expert 2 is never chosen."""
  x = rand((2, 12, D), 0)
  router = rand((D, E), 1, D**-0.5).at[:, 2].set(-10.0)
  return x, jnp.abs(x), router, rand((E, D, S), 2, D**-0.5), rand((E, S, D), 3, S**-0.5)


@functools.lru_cache(maxsize=None)  # each (mode, dtype) compiled once per session
def sigma_grad(mode, interpret=False, dtype=jnp.float32):
  fn = functools.partial(moe._sigma_moe, top_k=K, mode=mode, cap=16, interpret=interpret)

  def loss(x, r_in, router, keys, values):
    y, probs, counts = fn(x.astype(dtype), r_in, router, keys, values)
    return jnp.sum(jnp.square(y.astype(jnp.float32))) + jnp.sum(probs * jnp.arange(E)), (y, counts)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4), has_aux=True))(*sigma_inputs())


def switch_inputs():
  x_r = jnp.abs(rand((2, 10, D), 4))
  sel = rand((D, H, EA), 5, D**-0.5).at[:, 1, 3].set(-10.0)  # head 1's expert 3: an empty group
  return x_r, sel


@functools.lru_cache(maxsize=None)
def switch_grad(which, mode, interpret=False, dtype=jnp.float32):
  x_r, sel = switch_inputs()
  if which == "v":
    fn = functools.partial(switchhead._switch_v, k=KA, mode=mode, cap=16, interpret=interpret)
    x, w = rand((2, 10, D), 6), rand((H, EA, D, HD), 7, D**-0.5)
  else:
    fn = functools.partial(switchhead._switch_o, k=KA, mode=mode, cap=16, interpret=interpret)
    x, w = rand((2, 10, H, HD), 8), rand((H, EA, HD, D), 9, (H * HD) ** -0.5)

  def loss(x_r, x, sel, w):
    y, probs, counts = fn(x_r, x.astype(dtype), sel, w)
    return jnp.sum(jnp.square(y.astype(jnp.float32))) + jnp.sum(probs * jnp.arange(EA)), (y, counts)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x_r, x, sel, w)


# ----------------------------------------------------------------------------
# megablox in interpret mode against the dense reference.


def test_megablox_layout_pads_whole_tiles_in_group_order():
  group = jnp.asarray(np.random.default_rng(1).integers(0, 5, 203), jnp.int32).at[:20].set(4)
  group = jnp.where(group == 2, 3, group)  # group 2 empty
  lay = dispatch.plan_layout(group, 5, "megablox", cap=32)
  t = dispatch.megablox_rows(203, 5, 32)
  assert lay.block == t == 32 and lay.slot.shape[0] == 224  # 203 rows padded to 7 tiles of 32
  slot, valid = np.asarray(lay.slot), np.asarray(lay.valid)
  assert valid.sum() == 203 and sorted(slot[valid]) == list(range(203))
  rows_group = np.asarray(group)[slot[valid]]
  assert (np.diff(rows_group) >= 0).all()  # sorted by group
  np.testing.assert_array_equal(np.asarray(lay.group_sizes), np.bincount(np.asarray(group), minlength=5))
  assert dispatch.megablox_rows(6, 155, 512) == 16 and dispatch.megablox_rows(49152, 155, 512) == 128


def test_megablox_sigma_moe_matches_dense_with_gradients():
  (_, (y, counts)), g = sigma_grad("megablox", interpret=True)
  (_, (y_ref, counts_ref)), g_ref = sigma_grad("dense")
  assert counts[2] == 0 and counts.sum() == 2 * 12 * K  # an empty expert group
  np.testing.assert_array_equal(counts, counts_ref)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for name, a, b in zip(("x", "router", "keys", "values"), g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
  assert np.abs(np.asarray(g[2][2])).max() == 0 and np.abs(np.asarray(g[2])).sum((1, 2)).min() == 0
  assert (np.abs(np.asarray(g[2])).sum((1, 2)) > 0).sum() == E - 1  # every used expert gets a gradient


def test_megablox_with_several_k_and_n_tiles_matches_ragged_dot():
  """A grouped linear of 256 -> 384 features (2 x 3 tiles of 128, accumulated over k in the kernel;
  dW's k and n tiles too) with gates and a scatter to tokens, against `jax.lax.ragged_dot`; the last
  group is empty, so the padding rows form it alone."""
  n, g, a = 20, 5, 40
  # groups 0-3; the last group (4), which also takes the padding rows, is empty
  group = jnp.asarray(np.where(np.arange(a) % 7 == 0, 0, np.random.default_rng(2).integers(1, g - 1, a)), jnp.int32)
  src, dst = jnp.arange(a) // 2, (jnp.arange(a) * 7) % n
  x, w, gate = rand((n, 256), 10), rand((g, 256, 384), 11, 256**-0.5), jax.nn.sigmoid(rand((a,), 12))

  def run(mode, interpret):
    lay = dispatch.plan_layout(group, g, mode, cap=16)
    f = lambda x, w, gate: dispatch.grouped_linear(x, w, lay, mode, src=src, dst=dst, gate=gate, n_out=n,
                                                   interpret=interpret)
    y, vjp = jax.vjp(f, x, w, gate)
    return y, vjp(rand((n, 384), 13))

  y, grads = jax.jit(lambda: run("megablox", True))()
  y_ref, grads_ref = jax.jit(lambda: run("ragged", False))()
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for name, a_, b in zip(("x", "w", "gate"), grads, grads_ref):
    np.testing.assert_allclose(a_, b, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("which", ["v", "o"])
def test_megablox_switchhead_matches_dense_with_gradients(which):
  (_, (y, counts)), g = switch_grad(which, "megablox", interpret=True)
  (_, (y_ref, _)), g_ref = switch_grad(which, "dense")
  assert counts.reshape(H, EA)[1, 3] == 0
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for name, a, b in zip(("x_r", "x", "sel", "w"), g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_megablox_in_bfloat16_is_close_to_float32():
  """bf16 inputs and weights (float32 accumulation in the kernel) against the float32 dense reference:
  relative error (Frobenius) of the output and of every gradient below 2e-2 (bf16 has an 8-bit mantissa,
  ~4e-3 per rounding; a few roundings per path)."""
  (_, (y, _)), g = sigma_grad("megablox", interpret=True, dtype=jnp.bfloat16)
  (_, (y_ref, _)), g_ref = sigma_grad("dense")
  assert y.dtype == jnp.bfloat16 and rel(y, y_ref) < 2e-2
  for name, a, b in zip(("x", "router", "keys", "values"), g, g_ref):
    assert rel(a, b) < 2e-2, name
  (_, (v, _)), gv = switch_grad("v", "megablox", interpret=True, dtype=jnp.bfloat16)
  (_, (v_ref, _)), gv_ref = switch_grad("v", "dense")
  assert rel(v, v_ref) < 2e-2 and all(rel(a, b) < 2e-2 for a, b in zip(gv, gv_ref))


# ----------------------------------------------------------------------------
# Choice per backend and the error lines.


@pytest.mark.parametrize("backend,chosen", [("cpu", "loop"), ("gpu", "blocks"), ("cuda", "blocks"),
                                            ("tpu", "megablox")])
def test_auto_dispatch_per_backend(backend, chosen):
  assert dispatch.choose_dispatch("auto", backend) == (chosen, "")


@pytest.mark.parametrize("mode,backend,runs_on", [("megablox", "cpu", "tpu"), ("megablox", "gpu", "tpu"),
                                                  ("ragged_mgpu", "cpu", "gpu"), ("ragged_mgpu", "tpu", "gpu")])
def test_dispatch_the_backend_cannot_run_is_an_error_naming_what_works(mode, backend, runs_on):
  with pytest.raises(ConfigError) as e:
    dispatch.choose_dispatch(mode, backend)
  msg = str(e.value)
  assert msg.startswith(f"model.moe.dispatch={mode!r} does not run on the {backend} backend (it runs on {runs_on}")
  works = ["loop", "blocks", "ragged"] + (["megablox"] if backend == "tpu" else []) + \
      (["ragged_mgpu"] if backend == "gpu" else []) + ["dense"]
  assert f"use one of {works} or 'auto'" in msg


def test_dispatch_missing_from_the_installed_jax_is_named(monkeypatch):
  monkeypatch.setitem(dispatch.MODULES, "megablox", ("jax.experimental.pallas.ops.tpu.no_such_kernel",))
  with pytest.raises(ConfigError, match=r"model.moe.dispatch='megablox' is not available on the tpu backend: "
                                        r"jax \S+ has no jax.experimental.pallas.ops.tpu.no_such_kernel"):
    dispatch.choose_dispatch("megablox", "tpu")
  chosen, why = dispatch.choose_dispatch("auto", "tpu")  # auto: ragged_dot, and says why
  assert chosen == "ragged" and why.startswith("megablox dispatch not used: jax")


def test_mgpu_shape_and_dtype_limits_are_named():
  assert dispatch.mgpu_problem(1024, 128, jnp.bfloat16) is None
  assert "float32" in dispatch.mgpu_problem(1024, 128, jnp.float32)
  assert "412 -> 128" in dispatch.mgpu_problem(412, 128, jnp.bfloat16)  # the 44M preset's d_model


def moeut_cfg(dispatch_mode="auto", **model):
  c = config_lib.base_config()
  c.model.block, c.model.norm, c.model.num_kv_heads = "moeut", "layer", c.model.num_heads
  c.model.moe.experts, c.model.moe.expert_size, c.model.moe.dispatch = 8, 16, dispatch_mode
  for k, v in model.items():
    c.model[k] = v
  return config_lib.load(c).model


def test_ragged_mgpu_on_a_model_it_cannot_take_is_an_error_at_build():
  ok = moeut_cfg("ragged_mgpu", compute_dtype="bfloat16", d_model=128, num_heads=2, num_kv_heads=2, head_dim=64)
  assert kernels.choose(dataclasses.replace(ok, moe=dataclasses.replace(ok.moe, expert_size=64)), "gpu").moe == \
      "ragged_mgpu"
  with pytest.raises(ConfigError, match=r"model.moe.dispatch='ragged_mgpu' cannot run this model on the gpu "
                                        r"backend: a grouped matmul of 128 -> 16 features"):
    kernels.choose(ok, "gpu")  # expert_size 16
  with pytest.raises(ConfigError, match="compute dtype float32"):
    kernels.choose(moeut_cfg("ragged_mgpu"), "gpu")


def test_auto_logs_the_moe_dispatch_with_the_other_kernels(caplog, monkeypatch):
  monkeypatch.setattr(kernels, "_logged", set())
  with caplog.at_level(logging.INFO, logger="absl"):
    kernels.resolved(moeut_cfg(), "tpu")
    kernels.resolved(moeut_cfg(), "cpu")
  assert "kernels on tpu: attention=splash, dense=xla, moe dispatch=megablox" in caplog.text
  assert "kernels on cpu: attention=blocked, dense=custom_vjp, moe dispatch=loop" in caplog.text
  assert kernels.choose(moeut_cfg("ragged"), "gpu").moe == "ragged"
  assert kernels.choose(config_lib.load(config_lib.base_config()).model, "tpu").moe == ""  # no experts


def test_cli_reports_a_dispatch_the_backend_cannot_run_as_one_line():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-m", "recursive_lm.benchmark", "compile", "--config",
                        os.path.join(REPO, "configs/moeut.py:size=tiny"), "--config.model.moe.dispatch=megablox"],
                       env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 2, run.stderr[-2000:]
  assert run.stderr.strip().splitlines()[-1].startswith(
      "error: model.moe.dispatch='megablox' does not run on the cpu backend (it runs on tpu; on cpu use one of "
      "['loop', 'blocks', 'ragged', 'dense'] or 'auto')")


# ----------------------------------------------------------------------------
# The Mosaic GPU ragged dot (Hopper): only where a GPU runs it.


def test_ragged_mgpu_forward_and_dx_trace_against_the_installed_kernel():
  """Shape-level check on CPU that the calls match the installed kernel's signature (the forward, and dx
  with the transposed weights). dW's kernel reads the device's SM count while tracing, so it traces on a
  GPU only."""
  sizes = jnp.array([40, 0, 60, 50, 50, 50, 25, 25], jnp.int32)
  x, w, g = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((300, 128), (8, 128, 192), (300, 192)))
  assert jax.eval_shape(lambda x, w: dispatch._mgpu_dot(x, w, sizes), x, w).shape == (300, 192)
  assert jax.eval_shape(lambda g, w: dispatch._mgpu_dot(g, w, sizes, transpose_rhs=True), g, w).shape == (300, 128)


@pytest.mark.skipif(kernels.backend_name() != "gpu", reason="the Mosaic GPU ragged dot needs an NVIDIA Hopper GPU")
def test_ragged_mgpu_on_a_gpu_is_close_to_the_float32_reference():
  """bf16 sigma-MoE through the Mosaic GPU kernels (d 128, expert size 64, an empty expert) against the
  float32 dense reference: output and gradients within 2e-2 relative error, as megablox above."""
  d, e, s, k = 128, 8, 64, 2
  x = rand((4, 64, d), 0)
  router = rand((d, e), 1, d**-0.5).at[:, 5].set(-10.0)
  params = (router, rand((e, d, s), 2, d**-0.5), rand((e, s, d), 3, s**-0.5))

  def grad(mode, dtype):
    fn = functools.partial(moe._sigma_moe, top_k=k, mode=mode, cap=512)

    def loss(x, *p):
      y, _, counts = fn(x.astype(dtype), jnp.abs(x), *p)
      return jnp.sum(jnp.square(y.astype(jnp.float32))), (y, counts)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, *params)

  (_, (y, counts)), g = grad("ragged_mgpu", jnp.bfloat16)
  (_, (y_ref, _)), g_ref = grad("dense", jnp.float32)
  assert counts[5] == 0
  assert rel(y, y_ref) < 2e-2
  for name, a, b in zip(("x", "router", "keys", "values"), g, g_ref):
    assert rel(a, b) < 2e-2, name
