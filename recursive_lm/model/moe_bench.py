"""Throughput of the sigma-MoE layer against a dense ReLU MLP with the same
active FLOPs (hidden width top_k * expert_size, computed with the model's own
`linear`, so with the same hand-written backward as every Dense layer),
measured in one process with the two timed alternately so that load from
other processes hits both.

  python -m recursive_lm.model.moe_bench [out.json] [size]

`benchmark_moe(out_path, size, batches)` measures each batch of 1024-token
sequences in turn (the expert blocks grow with the tokens per call: at 4096
tokens the 44M layer's 155 experts get ~317 rows each, at the 44M preset's
training batch of 64 x 1024 ~5000) and writes a JSON record: per batch the
tokens/s of forward and of forward+backward for each and their ratios
(target: moe / dense >= 0.7 for forward+backward), and the dispatch used.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from recursive_lm.config import ConfigError
from recursive_lm.model.layers import linear
from recursive_lm.model.dispatch import resolve_dispatch
from recursive_lm.model.moe import SigmaMoE

# (d_model, experts, top_k, expert_size): the MoEUT paper's MLP layers.
SIZES = {"44m": (412, 155, 12, 128), "126m": (768, 254, 12, 128), "244m": (1024, 387, 16, 128),
         "tiny": (64, 16, 4, 32)}


def _min_time(fn, args, reps: int) -> float:
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def benchmark_moe(out_path: str | None = None, size: str = "44m", batches=(4, 16, 64), seq: int = 1024,
                  rounds: int = 5, dispatch: str = "auto", block_cap: int = 512, dtype: str = "float32") -> dict:
  if size not in SIZES:
    raise ConfigError(f"moe benchmark size {size!r} is not one of {list(SIZES)}")
  if not batches or min(batches) < 1:
    raise ConfigError(f"moe benchmark batches={list(batches)} must be one or more integers >= 1")
  d, e, k, s = SIZES[size]
  rec = {"size": size, "d_model": d, "experts": e, "top_k": k, "expert_size": s, "block_cap": block_cap,
         "dispatch": resolve_dispatch(dispatch), "dtype": dtype, "backend": jax.default_backend(), "seq": seq,
         "results": [_measure(size, b, seq, rounds, dispatch, block_cap, dtype) for b in batches]}
  if out_path:
    with open(out_path, "w") as f:
      json.dump(rec, f, indent=2)
  return rec


def _measure(size: str, batch: int, seq: int, rounds: int, dispatch: str, block_cap: int, dtype: str) -> dict:
  """One batch: best-of-`rounds` times of the four functions, timed alternately."""
  d, e, k, s = SIZES[size]
  n = batch * seq
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], (batch, seq, d), jnp.float32).astype(dtype)
  with nnx.use_eager_sharding(False):
    layer = SigmaMoE(d, e, s, k, 1.0, nnx.Rngs(0), dispatch=dispatch, block_cap=block_cap)
  moe_params = (layer.router[...], layer.keys[...], layer.values[...])
  graphdef = nnx.graphdef(layer)
  w1 = (jax.random.normal(keys[1], (d, k * s)) * d**-0.5).astype(dtype)
  w2 = (jax.random.normal(keys[2], (k * s, d)) * (k * s) ** -0.5).astype(dtype)

  def moe_fwd(x, params):
    m = nnx.merge(graphdef, nnx.State({"router": params[0], "keys": params[1], "values": params[2]}))
    return m(x)[0]

  def dense_fwd(x, params):
    return linear(jax.nn.relu(linear(x, params[0])), params[1])

  def loss(f):
    return lambda x, p: jnp.sum(jnp.square(f(x, p).astype(jnp.float32)))

  fns = {
      "moe_fwd": (jax.jit(moe_fwd), (x, moe_params)),
      "dense_fwd": (jax.jit(dense_fwd), (x, (w1, w2))),
      "moe_fwd_bwd": (jax.jit(jax.grad(loss(moe_fwd), argnums=(0, 1))), (x, moe_params)),
      "dense_fwd_bwd": (jax.jit(jax.grad(loss(dense_fwd), argnums=(0, 1))), (x, (w1, w2))),
  }
  for fn, args in fns.values():  # compile + warm up
    jax.block_until_ready(fn(*args))
  best = {name: float("inf") for name in fns}
  for _ in range(rounds):  # alternate, keep the best of each
    for name, (fn, args) in fns.items():
      best[name] = min(best[name], _min_time(fn, args, 1))
  return {"batch": batch, "tokens": n, **{f"{name}_tok_s": n / t for name, t in best.items()},
          "ratio_fwd": best["dense_fwd"] / best["moe_fwd"],
          "ratio_fwd_bwd": best["dense_fwd_bwd"] / best["moe_fwd_bwd"]}


if __name__ == "__main__":
  print(json.dumps(benchmark_moe(sys.argv[1] if len(sys.argv) > 1 else None,
                                 sys.argv[2] if len(sys.argv) > 2 else "44m"), indent=2))
