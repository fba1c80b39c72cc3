"""The packed CPU matmul (recursive_lm/model/native.py) against XLA's dot on
Gemma 3 270M's shapes, each product alone, in one process.

  python experiments/gemma3_convert/packed_matmul_speed.py --out experiments/gemma3_convert/packed_matmul_speed.json

Products: the tied readout (x [M, 640] against a 262,144 x 640 table; XLA:
table @ x at one row, as `Embed.attend` computes it, x @ table^T above) and
an 18-layer MLP chain (640 -> 2 x 2048, gelu gate, -> 640, residual), XLA:
x @ W, packed: `native.packed_matmul` on `native.pack(W)`. Random float32
weights; the two sides alternate within each repeat and the fastest of
--repeats counts (ms). The chain's 283 MB fit a large L3, which flatters
both sides against a whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.model import native

D, F, LAYERS, VOCAB = 640, 2048, 18, 262_144


def best_ms(sides: dict, args: tuple, repeats: int) -> dict:
  for fn in sides.values():  # compile
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in sides}
  for _ in range(repeats):
    for name, fn in sides.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t)
  return {name: round(min(ts) * 1e3, 2) for name, ts in times.items()}


def chain(matmul):
  def run(x, weights):
    for gate_up, down in weights:
      gate, up = jnp.split(matmul(x, gate_up, 2 * F), 2, axis=-1)
      x = x + matmul(jax.nn.gelu(gate) * up, down, D)
    return x
  return jax.jit(run)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rows", default="1,8,64,512", help="MLP chain rows (the readout takes 1 and 8)")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  results = []

  table = rng.standard_normal((VOCAB, D), dtype=np.float32)
  packed, table = native.pack(table.T), jnp.asarray(table)
  for rows in (1, 8):
    x = jnp.asarray(rng.standard_normal((rows, D), dtype=np.float32))
    xla = (lambda x, t, p: (t @ x[0])[None]) if rows == 1 else (lambda x, t, p: x @ t.T)
    ms = best_ms({"xla": jax.jit(xla), "packed": jax.jit(lambda x, t, p: native.packed_matmul(x, p, VOCAB))},
                 (x, table, packed), args.repeats)
    results.append({"product": "readout 640 x 262144", "rows": rows, "xla_ms": ms["xla"], "packed_ms": ms["packed"]})
    print(results[-1], flush=True)
  del table, packed

  plain = [[jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02) for shape in ((D, 2 * F), (F, D))]
           for _ in range(LAYERS)]
  packed = [[native.pack(w) for w in layer] for layer in plain]
  xla_chain, packed_chain = chain(lambda a, w, n: a @ w), chain(native.packed_matmul)
  for rows in (int(r) for r in args.rows.split(",")):
    x = jnp.asarray(rng.standard_normal((rows, D), dtype=np.float32))
    ms = best_ms({"xla": lambda x, w, p: xla_chain(x, w), "packed": lambda x, w, p: packed_chain(x, p)},
                 (x, plain, packed), args.repeats)
    results.append({"product": f"{LAYERS}-layer MLP chain", "rows": rows, "xla_ms": ms["xla"],
                    "packed_ms": ms["packed"]})
    print(results[-1], flush=True)

  record = {"repeats": args.repeats, "cpu_cores": len(os.sched_getaffinity(0)), "load_average": os.getloadavg(),
            "jax": jax.__version__, "results": results}
  if args.out:
    with open(args.out, "w") as f:
      f.write(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
  main()
