"""One process of the 2-process batch check in tests/test_multihost.py.

  python tests/multihost_worker.py CONFIG_JSON
with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set and 4
simulated CPU devices per process (XLA_FLAGS). Builds the global batches
from this process's rows (data.train_iterator / eval_batches +
sharding.global_batch) and checks every local shard, and the all-gathered
array, against the batches of a single-process pipeline. Prints one JSON line
and exits 0 when they agree.
"""

import json
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from recursive_lm import config as config_lib
from recursive_lm import data, sharding


def main(overrides_json: str) -> None:
  jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                             num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                             process_id=int(os.environ["JAX_PROCESS_ID"]), initialization_timeout=60)
  c = config_lib.base_config()
  for key, value in json.loads(overrides_json).items():
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = value
  cfg = config_lib.load(c)
  pi, pc = jax.process_index(), jax.process_count()
  mesh = sharding.make_mesh(cfg.mesh)
  preset = cfg.mesh.rules

  local_it = data.train_iterator(cfg.data, cfg.seed, pi, pc)
  full_it = data.train_iterator(cfg.data, cfg.seed, 0, 1)
  pairs = [(next(local_it), next(full_it)) for _ in range(3)]
  pairs += zip(data.eval_batches(cfg.data, 2, pi, pc), data.eval_batches(cfg.data, 2, 0, 1))
  checked = 0
  for local, full in pairs:
    b_local = cfg.data.batch_size // pc
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(local[key], full[key][pi * b_local:(pi + 1) * b_local])
    batch = sharding.global_batch(local, mesh, preset)
    for key, array in batch.items():
      assert array.shape == full[key].shape, (key, array.shape, full[key].shape)
      for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[key][shard.index])
        checked += 1
      gathered = multihost_utils.process_allgather(array, tiled=True)
      np.testing.assert_array_equal(np.asarray(gathered), full[key])
  print(json.dumps({"process": pi, "processes": pc, "devices": jax.device_count(),
                    "local_devices": jax.local_device_count(), "shards_checked": checked}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1])
