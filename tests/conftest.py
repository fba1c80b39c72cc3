"""Test set-up: 8 simulated CPU devices, Flax eager sharding off, tiny configs,
and the same meaning of a float32 tolerance on every backend.

The XLA flags must be in the environment before jax is imported anywhere,
which is why this happens at the top of conftest (pytest imports it first).
The suite also runs on an accelerator machine (a GPU image with a newer jax):
CPU-only flags are added only where jax will run on the CPU, flags an XLA
no longer knows are left out (an unknown XLA flag aborts start-up), and
tests that need more devices than the backend has skip with the reason.
"""

import importlib.metadata
import importlib.util
import os


def _runs_on_cpu() -> bool:
  """True unless jax will pick an accelerator: JAX_PLATFORMS says so, or a
  PJRT plugin (CUDA / ROCm: the jax_plugins package) or libtpu is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0] == "cpu"
  return importlib.util.find_spec("jax_plugins") is None and importlib.util.find_spec("libtpu") is None


def _jaxlib_version() -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return (0, 0)


# 8 simulated host devices for the sharding tests (on an accelerator the default
# backend has its own device count, and tests marked `devices(n)` skip). On the CPU,
# the other flags cut XLA:CPU compile time of the tiny test models about 3-6x
# (measured: 6.7 -> 1.1 CPU-s for a scanned forward + backward); compiling, not
# running, is what these tests spend their time on, and the flags do not change
# what is computed. XLA 0.11 removed --xla_cpu_use_fusion_emitters.
_FLAGS = ["--xla_force_host_platform_device_count=8"]
if _runs_on_cpu():
  _FLAGS += ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
  if _jaxlib_version() < (0, 11):
    _FLAGS.append("--xla_cpu_use_fusion_emitters=false")
for _flag in _FLAGS:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# pytest-xdist runs the suite in two worker processes (pyproject addopts). On an
# accelerator each jax process would otherwise take 75 % of the device memory at
# start-up, and the second worker could not start.
if os.environ.get("PYTEST_XDIST_WORKER"):
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import flax  # noqa: E402
from tiny_run import set_keys  # noqa: E402

# Models in tests are built outside any mesh; with eager sharding on, Flax
# would demand a mesh for every Variable that carries logical axis names.
flax.config.update("flax_always_shard_variable", False)

import jax  # noqa: E402
import pytest  # noqa: E402

# The float32 comparisons (rtol 1e-5 and tighter) assume float32 matmuls. GPUs
# default to TF32 (a 10-bit mantissa) and TPUs to bfloat16 passes; pin full
# precision so a tolerance means the same everywhere. On the CPU this changes nothing.
jax.config.update("jax_default_matmul_precision", "highest")

from recursive_lm import config as config_lib  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "devices(n): needs n devices of the default backend; skipped with the reason "
                                     "when there are fewer")


def pytest_collection_modifyitems(config, items):
  have = jax.device_count()
  for item in items:
    marker = item.get_closest_marker("devices")
    if marker is not None and have < marker.args[0]:
      item.add_marker(pytest.mark.skip(reason=f"needs {marker.args[0]} devices, {jax.default_backend()} has {have} "
                                              "(on the CPU the suite simulates 8 unless XLA_FLAGS sets a count)"))


def tiny_config(**overrides):
  """A base_config() ConfigDict with small, shape-hostile dimensions.

  d_model 42 with 3 heads gives head_dim 14 (even rotary dims); vocab 61,
  mlp 46 and seq_len 7 are primes or odd so that transposed or mixed-up
  axes fail loudly. Overrides use dotted keys: tiny_config(**{"model.plan.preset": "cycle"}),
  or nested plain names for the common ones (preset, num_layers, repeats, lora_rank,
  per_depth_norms, remat).
  """
  c = config_lib.base_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 61, 42, 3, 1, 46
  m.max_seq_len = 32
  c.data.seq_len, c.data.batch_size = 7, 2
  short = {"preset": "model.plan.preset", "num_layers": "model.plan.num_layers", "repeats": "model.plan.repeats",
           "per_depth_norms": "model.plan.per_depth_norms", "lora_rank": "model.lora.rank", "remat": "model.remat"}
  return set_keys(c, {short.get(key, key): value for key, value in overrides.items()})


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  """After each test module, drop JAX's compiled programs. The whole suite
  compiles thousands of small programs in one process; each XLA:CPU
  executable keeps its own memory mappings, and a whole-suite run was seen to
  crash inside the compiler late in the run (segmentation fault), which is
  what running out of mappings (vm.max_map_count) looks like."""
  yield
  jax.clear_caches()
