"""Test set-up: 8 simulated CPU devices, Flax eager sharding off, tiny configs.

The XLA flag must be in the environment before jax is imported anywhere, which
is why this happens at the top of conftest (pytest imports it first).
"""

import os

# 8 simulated devices for sharding tests. The other flags cut XLA:CPU compile
# time of the tiny test models about 3-6x (measured: 6.7 -> 1.1 CPU-s for a
# scanned forward + backward); compiling, not running, is what these tests
# spend their time on, and the flags do not change what is computed.
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true", "--xla_cpu_use_fusion_emitters=false")
for _flag in _FLAGS:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import flax  # noqa: E402
from tiny_run import set_keys  # noqa: E402

# Models in tests are built outside any mesh; with eager sharding on, Flax
# would demand a mesh for every Variable that carries logical axis names.
flax.config.update("flax_always_shard_variable", False)

from recursive_lm import config as config_lib  # noqa: E402


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
