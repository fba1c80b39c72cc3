"""Record every depth path's outputs on tiny random models, to compare a
refactor of the depth walk against (bit for bit on one machine).

  python experiments/one_walk/record.py --out before.npz
  python experiments/one_walk/record.py --out after.npz --compare before.npz

Each case builds a tiny perturbed model (tests/test_decode.py `build`) and
records: the scanned and unrolled forward logits, loss and gradients, the
cached decode (greedy and sampled), and for plans with loops the exit walks
(decode with exits, teacher-forced exits, the speculation draft) and the
probes' residual stream. --compare prints the largest difference per array
and exits 1 when any differs.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
import conftest  # noqa: E402,F401  (XLA flags, eager sharding off, float32 precision)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from test_decode import build  # noqa: E402

REC = {"model.plan.prelude": 1, "model.plan.coda": 1, "model.recurrent.injection": "concat"}
CASES = {
    "vanilla": dict(preset="vanilla", num_layers=2),
    "looped": dict(preset="looped", num_layers=3, lora_rank=2),
    "cycle": dict(preset="cycle", num_layers=4, repeats=2, lora_rank=2),
    "sequence": dict(preset="sequence", num_layers=4, repeats=2, lora_rank=3, per_depth_norms=True),
    "middle_cycle": dict(preset="middle_cycle", num_layers=6, repeats=2, lora_rank=2),
    "middle_sequence": dict(preset="middle_sequence", num_layers=6, repeats=2),
    "sandwich": dict(preset="sandwich", num_layers=4, per_depth_norms=True),
    "recurrent": dict(preset="recurrent", num_layers=6, repeats=2, lora_rank=2, per_depth_norms=True, **REC),
    "cla": dict(preset="cycle", num_layers=4, repeats=2, lora_rank=2, **{"model.kv_sharing": "cla:2"}),
    "kv_recursion": dict(preset="cycle", num_layers=4, repeats=2, **{"model.kv_sharing": "recursion"}),
    "windows": dict(preset="cycle", num_layers=4, repeats=2, lora_rank=2,
                    **{"model.sliding_window": 3, "model.global_every": 2}),
    "mor": dict(preset="middle_cycle", num_layers=8, repeats=3, lora_rank=2, per_depth_norms=True,
                **{"model.mor.routing": "expert", "model.mor.capacities": "0.9,0.6,0.3",
                   "model.mor.router_scale": 0.5}),
}


def record(name, kw) -> dict:
  from recursive_lm.analysis import probes
  from recursive_lm.inference import exits, generate, speculate
  out = {}
  model = build(**kw)
  graphdef, state = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 61, dtype=jnp.int32)
  for unrolled in (False, True):
    out[f"logits_unrolled{int(unrolled)}"] = jax.jit(
        lambda s, t, u=unrolled: nnx.merge(graphdef, s)(t, unrolled=u)[0])(state, tokens)

  def loss(s, t):
    logits, _, aux = nnx.merge(graphdef, s)(t[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()

  value, grads = jax.jit(jax.value_and_grad(loss))(state, tokens)
  out["loss"] = value
  for i, g in enumerate(jax.tree.leaves(grads)):
    out[f"grad_{i}"] = g
  prompt = tokens[:, :4]
  toks, logits = generate(model, prompt, 4, return_logits=True)
  out["greedy_tokens"], out["greedy_logits"] = toks, logits
  out["sampled_tokens"] = generate(model, prompt, 4, temperature=0.8, top_k=5, seed=3)
  try:
    exits.check_model(model)
    has_loops = model.routed is None
  except ValueError:
    has_loops = False
  if has_loops:
    rule = exits.ExitRule("confidence", 0.025)
    cache = model.init_cache(2, 16)
    lg, cache, ran = jax.jit(lambda s, t, c: exits.forward_with_exits(nnx.merge(graphdef, s), t, c, jnp.zeros(
        (2,), jnp.int32), rule))(state, prompt, cache)
    out["exit_logits"], out["exit_loops"] = lg, ran
    out["exit_cache"] = jax.tree.leaves(cache)[0]
    if not model.recurrent and model.plan.kv_sharing == "none":
      lg, ran = jax.jit(lambda s, t: exits.teacher_forced(nnx.merge(graphdef, s), t, rule))(state, tokens)
      out["tf_logits"], out["tf_loops"] = lg, ran
    if not model.recurrent:
      depth = speculate.draft_depth(model, 1)
      cache = model.init_cache(2, 16)
      lg, cache = jax.jit(lambda s, t, c: speculate.forward_draft(nnx.merge(graphdef, s), t, c, jnp.zeros(
          (2,), jnp.int32), depth))(state, prompt, cache)
      out["draft_logits"] = lg
  if model.routed is None:
    h = probes.hidden_states(model, tokens)
    out["hidden"] = np.asarray(h)
  return {f"{name}/{k}": np.asarray(v) for k, v in out.items()}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--compare")
  ap.add_argument("--cases", default=",".join(CASES))
  a = ap.parse_args()
  arrays = {}
  for name in a.cases.split(","):
    arrays.update(record(name, CASES[name]))
    print(name, "recorded", flush=True)
  np.savez(a.out, **arrays)
  if a.compare:
    ref = dict(np.load(a.compare))
    bad = 0
    for k in sorted(set(ref) | set(arrays)):
      if k not in ref or k not in arrays:
        print(f"{k}: only in {'after' if k in arrays else 'before'}")
        bad += 1
        continue
      x, y = ref[k], arrays[k]
      same = x.shape == y.shape and np.array_equal(x, y)
      if not same:
        bad += 1
        diff = np.max(np.abs(x.astype(float) - y.astype(float))) if x.shape == y.shape else "shape"
        print(f"{k}: differs ({diff})")
    print(f"{len(ref)} arrays compared, {bad} differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
  main()
