"""The packed small-row matmul of CPU decoding: `packed_matmul.cc` built on
first use and called as an XLA custom call.

  pack(w [..., K, N])          -> p [..., ceil(N/32), K, 32]   once, outside the decode loop
  packed_matmul(x [..., K], p, n) -> x @ W [..., n]            inside it

`inference.layer_weights.packed_copy` packs every dense weight of a model
and the tied readout this way (`Engine(matmul="native")`, `generate --matmul
native`). The source is compiled with the C++ compiler in $CXX (default c++)
for this CPU (-march=native) into $RECURSIVE_LM_CACHE (default
~/.cache/recursive_lm)/native/, keyed by a hash of the source, the flags, the
compiler, jax's version and the CPU's feature flags; the library is written
to a temporary name and renamed, so a half-written one is never loaded.
Float32 only, CPU only: any other case is an error naming it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.config import ConfigError

TILE = 32  # output columns per packed tile (two 16-float vectors in the kernel)
SOURCE = pathlib.Path(__file__).with_name("packed_matmul.cc")
TARGET = "recursive_lm_packed_matmul"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")
_lock = threading.Lock()
_registered = False


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    return ""


def build(cache_dir: str | None = None) -> pathlib.Path:
  """The compiled library's path, compiling it when this cache lacks it.

  Raises ConfigError when no C++ compiler is found or compiling fails (with
  the compiler's first error line)."""
  cxx = os.environ.get("CXX", "c++")
  exe = shutil.which(cxx)
  if exe is None:
    raise ConfigError(f"matmul='native' builds {SOURCE.name} with a C++17 compiler: {cxx!r} not found (set CXX)")
  version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
  key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, jax.__version__,
                                  _cpu_flags()]).encode()).hexdigest()[:16]
  root = pathlib.Path(cache_dir or os.environ.get("RECURSIVE_LM_CACHE", pathlib.Path.home() / ".cache/recursive_lm"))
  lib = root / "native" / f"packed_matmul-{key}.so"
  if lib.exists():
    return lib
  lib.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
  os.close(fd)
  cmd = [exe, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    os.unlink(tmp)
    last = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["?"]
    raise ConfigError(f"matmul='native': compiling {SOURCE.name} with {exe} failed: {last[0]}")
  os.replace(tmp, lib)  # atomic: another process building the same key at once is harmless
  return lib


def ensure_built() -> None:
  """Compile (if this cache lacks it) and register the kernel, once per
  process; ConfigError when it cannot be built."""
  global _registered
  with _lock:
    if not _registered:  # ctypes keeps the library loaded
      library = ctypes.cdll.LoadLibrary(str(build()))
      jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.PackedMatmulHandler), platform="cpu")
      _registered = True


def pack(w) -> jax.Array:
  """w float32 [..., K, N] -> [..., ceil(N/32), K, 32]: column tile t of each
  matrix, row after row, zero past column N. A copy of w."""
  w = jnp.asarray(w)
  if w.dtype != jnp.float32 or w.ndim < 2:
    raise ValueError(f"pack: needs a float32 weight [..., K, N], got {w.dtype} {w.shape}")
  *lead, k, n = w.shape
  tiles = -(-n // TILE)
  w = jnp.pad(w, [(0, 0)] * (len(lead) + 1) + [(0, tiles * TILE - n)])
  return jnp.moveaxis(w.reshape(*lead, k, tiles, TILE), -2, -3)


def unpack(p: jax.Array, n: int) -> jax.Array:
  """The inverse of `pack`: [..., T, K, 32] -> [..., K, n]."""
  *lead, tiles, k, _ = p.shape
  return jnp.moveaxis(p, -3, -2).reshape(*lead, k, tiles * TILE)[..., :n]


def packed_matmul(x: jax.Array, p: jax.Array, n: int) -> jax.Array:
  """x float32 [..., K] @ W -> [..., n], with p = pack(W) [ceil(n/32), K, 32].

  Forward only (no derivative), float32, CPU: the decode loop's product."""
  ensure_built()
  if x.dtype != jnp.float32 or p.dtype != jnp.float32:
    raise ValueError(f"packed_matmul: float32 only, got x {x.dtype} and p {p.dtype}")
  if p.ndim != 3 or p.shape[1:] != (x.shape[-1], TILE) or not (p.shape[0] - 1) * TILE < n <= p.shape[0] * TILE:
    raise ValueError(f"packed_matmul: x {x.shape} and p {p.shape} do not hold a [{x.shape[-1]}, {n}] weight")
  rows = int(np.prod(x.shape[:-1]))
  y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, n), jnp.float32))(x.reshape(rows, x.shape[-1]), p)
  return y.reshape(*x.shape[:-1], n)
