"""Kernel choice per backend (recursive_lm.model.kernels): the selection for
'cpu', 'gpu' and 'tpu' by name (no device needed), the error lines of kernels a
backend cannot run, and every attention kernel that runs on CPU (XLA
dot_product_attention, the splash Pallas kernel in interpret mode, blocked)
against the plain masked `attend`: values and q/k/v gradients, causal and
windowed (static and traced windows), GQA, bfloat16 against float32."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recursive_lm import config as config_lib
from recursive_lm.config import ConfigError, KernelsConfig
from recursive_lm.model import attention, kernels
from recursive_lm.model.layers import linear
from recursive_lm.model.transformer import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_cfg(attention_kernel="auto", dense="auto", **model):
  c = config_lib.base_config()
  c.model.kernels.attention, c.model.kernels.dense = attention_kernel, dense
  for k, v in model.items():
    c.model[k] = v
  return config_lib.load(c).model


# ----------------------------------------------------------------------------
# Selection, per backend name.


@pytest.mark.parametrize("backend,attn,dense", [("cpu", "blocked", "custom_vjp"), ("gpu", "cudnn", "xla"),
                                                ("tpu", "splash", "xla")])
def test_auto_choice_per_backend(backend, attn, dense):
  choice = kernels.choose(model_cfg(compute_dtype="bfloat16"), backend)
  assert (choice.attention, choice.dense) == (attn, dense)


def test_auto_on_cpu_keeps_todays_kernels():
  """The measured CPU path: the blocked attention and the custom-VJP linear."""
  cfg = model_cfg()
  assert kernels.attention_kernel(cfg, "cpu") is attention.causal_attend_blocked
  assert kernels.dense_kernel(cfg, "cpu") is linear


@pytest.mark.parametrize("model,why", [(dict(compute_dtype="float32"), "compute_dtype='float32'"),
                                       (dict(compute_dtype="bfloat16", d_model=1024, num_heads=4), "head_dim=256")])
def test_auto_on_gpu_falls_back_to_xla_where_cudnn_cannot_and_says_why(model, why):
  choice = kernels.choose(model_cfg(**model), "gpu")
  assert choice.attention == "xla" and why in choice.why and why in choice.describe()


@pytest.mark.parametrize("attn,backend,works", [("cudnn", "cpu", "['xla', 'blocked']"),
                                                ("cudnn", "tpu", "['xla', 'splash', 'blocked']"),
                                                ("splash", "gpu", "['xla', 'cudnn', 'blocked']"),
                                                ("splash", "cpu", "['xla', 'blocked']")])
def test_kernel_the_backend_cannot_run_is_one_error_line(attn, backend, works):
  with pytest.raises(ConfigError) as e:
    kernels.choose(model_cfg(attn, compute_dtype="bfloat16"), backend)
  msg = str(e.value)
  assert "\n" not in msg and f"model.kernels.attention={attn!r}" in msg and backend in msg and works in msg


def test_explicit_cudnn_on_a_shape_it_cannot_take_is_an_error_not_a_fallback():
  with pytest.raises(ConfigError, match=r"model.kernels.attention='cudnn' .* gpu .*compute_dtype='float32'"):
    kernels.choose(model_cfg("cudnn"), "gpu")


def test_kernel_missing_from_the_installed_jax_is_named(monkeypatch):
  monkeypatch.setattr(kernels, "_SPLASH", "jax.experimental.no_such_splash")
  assert kernels.choose(model_cfg(), "tpu").attention == "xla"  # auto: falls back, and says why
  assert "jax.experimental.no_such_splash" in kernels.choose(model_cfg(), "tpu").why
  with pytest.raises(ConfigError, match=r"model.kernels.attention='splash' is not available on the tpu backend: "
                     r"jax .* has no jax.experimental.no_such_splash"):
    kernels.choose(model_cfg("splash"), "tpu")


@pytest.mark.parametrize("attn", ["xla", "blocked"])
@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_plain_kernels_run_everywhere(attn, backend):
  choice = kernels.choose(model_cfg(attn, "custom_vjp"), backend)
  assert (choice.attention, choice.dense) == (attn, "custom_vjp")


def test_unknown_kernel_name_fails_at_config_load():
  with pytest.raises(ConfigError, match=r"model.kernels.attention='flash' is not one of"):
    model_cfg("flash")
  with pytest.raises(ConfigError, match=r"model.kernels.dense='triton' is not one of"):
    model_cfg(dense="triton")


def test_run_directory_from_before_the_kernel_keys_loads_with_auto():
  """A config.json written without model.kernels reads back as auto (the same model as today's default)."""
  cfg = config_lib.load(config_lib.base_config())
  raw = json.loads(cfg.to_json())
  del raw["model"]["kernels"]
  old = config_lib.from_json(json.dumps(raw))
  assert old.model.kernels == KernelsConfig("auto", "auto") and old == cfg
  assert config_lib.from_json(cfg.to_json()) == cfg


def test_model_build_raises_for_a_kernel_this_backend_cannot_run():
  """The error surfaces when the model is built, not at the first call."""
  backend = kernels.backend_name()
  cfg = model_cfg("cudnn" if backend == "tpu" else "splash", compute_dtype="bfloat16")
  with pytest.raises(ConfigError, match=f"does not run on the {backend} backend"):
    nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))


def test_cli_reports_the_kernel_error_as_one_line_and_auto_logs_its_choice(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "recursive_lm.benchmark", "compile", "--config",
          os.path.join(REPO, "configs/default.py:size=tiny")]
  bad = subprocess.run(base + ["--config.model.kernels.attention=splash"], env=env, capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error: model.kernels.attention='splash' does not run on "
                                                        "the cpu backend")
  ok = subprocess.run(base + ["--verbosity=0"], env=env, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "kernels on cpu: attention=blocked, dense=custom_vjp" in ok.stderr


# ----------------------------------------------------------------------------
# The kernels that run on CPU, against the reference `attend`.


def rand(shape, seed, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def qkv(b, t, kh, g, hd, dtype=jnp.float32):
  q = rand((b, t, kh, g, hd), 0, dtype) * hd**-0.5
  return q, rand((b, t, kh, hd), 1, dtype), rand((b, t, kh, hd), 2, dtype)


def cpu_kernel(name, sliding_window=0):
  """The kernel function for `name`, chosen as a model would ('splash' as on a TPU, run interpreted)."""
  backend = "tpu" if name == "splash" else "cpu"
  cfg = model_cfg(name, sliding_window=sliding_window, global_every=2 if sliding_window else 0)
  return kernels.attention_kernel(cfg, backend, interpret=True)


def loss(fn, g):
  return lambda q, k, v: jnp.vdot(fn(q, k, v).astype(jnp.float32), g)


# Shapes: GQA with 2 query heads per K/V head; splash needs T a multiple of 128 (or one whole block).
SHAPES = {"xla": (2, 40, 2, 2, 16), "blocked": (2, 40, 2, 2, 16), "splash": (1, 256, 2, 2, 64)}


@pytest.mark.parametrize("name", ["xla", "blocked", "splash"])
@pytest.mark.parametrize("window", [None, 0, 24, "traced"])
def test_kernel_equals_reference_with_gradients(name, window):
  b, t, kh, g, hd = SHAPES[name]
  sw = 0 if window in (None, 0) else 24
  fn = cpu_kernel(name, sw)
  q, k, v = qkv(b, t, kh, g, hd)
  pos = jnp.arange(t, dtype=jnp.int32)
  ref_window = None if window is None else (0 if window == 0 else sw)
  ref = lambda q, k, v: attention.attend(q, k, v, pos, pos, None if ref_window is None else jnp.int32(ref_window))
  if window == "traced":  # as inside a scan over depths: the window is an int32 tracer (here: 24, then 0)
    ours = jax.jit(lambda q, k, v, w: fn(q, k, v, pos, w))
    ours_w = lambda q, k, v: ours(q, k, v, jnp.int32(sw))
    np.testing.assert_allclose(ours(q, k, v, jnp.int32(0)), attention.attend(q, k, v, pos, pos), atol=2e-5)
  else:
    ours_w = lambda q, k, v: fn(q, k, v, pos, window)
  np.testing.assert_allclose(ours_w(q, k, v), ref(q, k, v), atol=2e-5, rtol=1e-5)
  gout = rand(q.shape, 3)
  got = jax.grad(loss(ours_w, gout), (0, 1, 2))(q, k, v)
  want = jax.grad(loss(ref, gout), (0, 1, 2))(q, k, v)
  for a, w in zip(got, want):
    np.testing.assert_allclose(a, w, atol=5e-5, rtol=1e-4)


def test_splash_runs_per_batch_shard_under_a_mesh():
  """Under a data-parallel mesh (8 simulated devices) the Pallas call runs on
  each batch shard (shard_map): same values and gradients as the reference."""
  from recursive_lm import sharding
  from recursive_lm.config import MeshConfig
  mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1, expert=1, rules="data", distributed=False))
  fn = cpu_kernel("splash")
  q, k, v = qkv(8, 128, 1, 2, 32)
  pos = jnp.arange(128, dtype=jnp.int32)
  gout = rand(q.shape, 3)
  with sharding.mesh_context(mesh, "data"):
    out, grads = jax.jit(lambda q, k, v: (fn(q, k, v, pos, None),
                                          jax.grad(loss(lambda *a: fn(*a, pos, None), gout), (0, 1, 2))(q, k, v)))(q, k, v)
    assert "shard_map" in str(jax.make_jaxpr(lambda q, k, v: fn(q, k, v, pos, None))(q, k, v))
  ref = lambda q, k, v: attention.attend(q, k, v, pos, pos)
  np.testing.assert_allclose(out, ref(q, k, v), atol=2e-5)
  for a, w in zip(grads, jax.grad(loss(ref, gout), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, w, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["xla", "blocked", "splash"])
def test_kernel_in_bfloat16_is_close_to_float32(name):
  """bf16 inputs (scores and softmax in float32 inside every kernel): within 3e-2 of the fp32 reference."""
  b, t, kh, g, hd = SHAPES[name]
  fn = cpu_kernel(name)
  q, k, v = qkv(b, t, kh, g, hd)
  pos = jnp.arange(t, dtype=jnp.int32)
  out = fn(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), pos, None)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), attention.attend(q, k, v, pos, pos), atol=3e-2)


@pytest.mark.parametrize("dense", ["xla", "custom_vjp"])
@pytest.mark.parametrize("attn", ["xla", "blocked"])
def test_model_with_each_cpu_kernel_matches_the_default_in_training_and_decode(attn, dense):
  """A windowed GQA model (scanned depths: traced windows) with every kernel
  pair gives the default's logits and gradients, and its KV-cache decode
  agrees with the full forward."""
  base = dict(num_heads=4, num_kv_heads=2, sliding_window=5, global_every=2)
  ref_cfg = model_cfg(**base)
  cfg = dataclasses.replace(ref_cfg, kernels=KernelsConfig(attention=attn, dense=dense))
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)

  def logits_and_grad(c):
    model = Transformer(c, nnx.Rngs(0))
    f = lambda m: m(tokens)[0].astype(jnp.float32).std()
    return model(tokens)[0], nnx.grad(f)(model), model

  want, gwant, _ = logits_and_grad(ref_cfg)
  got, ggot, model = logits_and_grad(cfg)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(ggot), jax.tree.leaves(gwant)):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)
  cache = model.init_cache(2, 12)
  prefix, cache, _ = model(tokens[:, :7], cache, jnp.int32(0))
  step, _, _ = model(tokens[:, 7:8], cache, jnp.int32(7))
  np.testing.assert_allclose(step[:, 0], got[:, 7], atol=2e-4, rtol=1e-4)


@pytest.mark.skipif(kernels.backend_name() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("window", [None, 64, "traced"])
def test_cudnn_kernel_on_a_gpu_is_close_to_the_float32_reference(window):
  """bf16 cuDNN flash attention (GQA, causal / windowed) against the float32
  `attend`: values and gradients within bf16 tolerances."""
  b, t, kh, g, hd = 2, 256, 2, 4, 128
  sw = 0 if window is None else 64
  cfg = model_cfg("cudnn", compute_dtype="bfloat16", sliding_window=sw, global_every=2 if sw else 0)
  fn = kernels.attention_kernel(cfg)
  q, k, v = qkv(b, t, kh, g, hd)
  pos = jnp.arange(t, dtype=jnp.int32)
  w = None if window is None else jnp.int32(sw)
  if window == "traced":
    ours = jax.jit(lambda q, k, v: fn(q, k, v, pos, w))
  else:
    ours = lambda q, k, v: fn(q, k, v, pos, None if window is None else sw)
  ref = lambda q, k, v: attention.attend(q, k, v, pos, pos, w)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  np.testing.assert_allclose(ours(*bf).astype(jnp.float32), ref(q, k, v), atol=3e-2)
  gout = rand(q.shape, 3)
  got = jax.grad(loss(ours, gout), (0, 1, 2))(*bf)
  want = jax.grad(loss(ref, gout), (0, 1, 2))(q, k, v)
  for a, r in zip(got, want):
    scale = float(jnp.abs(r).max())
    np.testing.assert_allclose(a.astype(jnp.float32), r, atol=5e-2 * scale)
