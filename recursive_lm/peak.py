"""Peak FLOP/s of the devices a run uses, for MFU.

Accelerators: a table of dense bf16 peaks per chip. CPU: a float32 matmul
peak measured on this machine (all cores together, since simulated CPU
devices share them), kept as the best seen in ~/.cache/recursive_lm/peak.json.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp

# Dense bf16 FLOP/s per chip, from the vendors' data sheets.
KNOWN = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}

CACHE = os.path.expanduser("~/.cache/recursive_lm/peak.json")


def measure_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """Best-of-`repeats` float32 n x n matmul FLOP/s on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def cpu_peak() -> float:
  """The best matmul rate this machine has shown: measured now (about a
  second) and kept as the maximum over runs, so a measurement taken while
  other work shared the cores cannot lower the peak and inflate MFU."""
  key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|jax {jax.__version__}"
  cache = {}
  if os.path.exists(CACHE):
    with open(CACHE) as f:
      cache = json.load(f)
  best = max(cache.get(key, 0.0), measure_matmul_peak())
  if best != cache.get(key):
    cache[key] = best
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)
    with open(CACHE + ".tmp", "w") as f:
      json.dump(cache, f)
    os.replace(CACHE + ".tmp", CACHE)
  return best


def total_peak(configured: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of all devices of the run, where the number came from)."""
  devices = jax.devices()
  if configured > 0:
    return configured * len(devices), "config train.peak_flops"
  kind = devices[0].device_kind
  if devices[0].platform == "cpu":
    return cpu_peak(), "measured CPU matmul peak"
  for name, flops in KNOWN.items():
    if kind.startswith(name):
      return flops * len(devices), f"table ({kind})"
  return float("nan"), f"unknown device {kind!r}: set train.peak_flops"
