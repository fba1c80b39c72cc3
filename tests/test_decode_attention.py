"""The single-query decode attention (`attention.attend_one`, model.kernels.decode='single')
against the masked path (`attention.attend`), alone and inside decoding.

Alone: GQA, global / sliding / traced windows, a window longer than the cache,
positions shared by every row or one per row, queries before the first full
window. A windowed layer must not read the cache outside its window: slots
there are poisoned with NaN (the masked path would turn them into NaN).
In decoding: `generate` and the Engine with either kernel give the same
tokens and logits on tied plans with per-depth LoRA and sliding windows, the
scanned step (a traced window) included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recursive_lm.inference import generate
from recursive_lm.inference.engine import Engine
from recursive_lm.model import attention

from test_decode import V, build

B, S, K, G, HD = 3, 11, 2, 3, 4


def rand(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _qkv(seed=0):
  return rand((B, 1, K, G, HD), seed), rand((B, S, K, HD), seed + 1), rand((B, S, K, HD), seed + 2)


@pytest.mark.parametrize("window", [None, 0, 1, 4, S, S + 5, "traced4", "traced0"])
@pytest.mark.parametrize("pos", [[0, 2, 10], [5, 5, 5], [3], [10]])
def test_single_query_equals_masked(window, pos):
  q, k, v = _qkv()
  q_pos = jnp.asarray(pos, jnp.int32)[:, None] if len(pos) == B else jnp.asarray(pos, jnp.int32)
  w = jnp.int32(int(window[6:])) if isinstance(window, str) else window
  ref = attention.attend(q, k, v, q_pos, jnp.arange(S), None if w is None else jnp.asarray(w, jnp.int32))
  # Traced windows: under jit, as in a scan over depths.
  ours = jax.jit(attention.attend_one)(q, k, v, q_pos, w) if isinstance(window, str) else \
      attention.attend_one(q, k, v, q_pos, w)
  assert ours.shape == (B, 1, K, G, HD)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [1, 3, 6])
def test_windowed_layer_reads_only_its_window(window):
  q, k, v = _qkv(3)
  pos = np.array([window - 1, 7, S - 1])  # every row past its first full window
  inside = (np.arange(S)[None] <= pos[:, None]) & (np.arange(S)[None] > pos[:, None] - window)
  poison = lambda c: jnp.where(jnp.asarray(inside)[:, :, None, None], c, jnp.nan)
  q_pos = jnp.asarray(pos, jnp.int32)[:, None]
  ours = attention.attend_one(q, poison(k), poison(v), q_pos, window)
  ref = attention.attend(q, k, v, q_pos, jnp.arange(S), jnp.int32(window))
  assert np.isfinite(np.asarray(ours)).all()
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  assert not np.isfinite(np.asarray(attention.attend(q, poison(k), poison(v), q_pos, jnp.arange(S),
                                                     jnp.int32(window)))).all()  # the poison is real


WINDOWED = dict(preset="cycle", num_layers=4, repeats=2, lora_rank=2, **{
    "model.sliding_window": 3, "model.global_every": 2, "model.rope_base_local": 100.0})
PLANS = {
    "tied_lora_windows": WINDOWED,
    "sequence_lora_per_depth_norms_windows": dict(preset="sequence", num_layers=4, repeats=2, lora_rank=3,
                                                  per_depth_norms=True, **{"model.sliding_window": 2,
                                                                           "model.global_every": 3}),
    "kv_sharing_windows": dict(WINDOWED, **{"model.kv_sharing": "recursion"}),
}


def _pair(plan):
  """The same parameters under decode='single' and decode='masked'."""
  single = build(**plan)
  masked = build(**plan, **{"model.kernels.decode": "masked"})
  nnx.update(masked, nnx.state(single))
  assert single.stages[0].blocks.attn.decode is attention.attend_one
  assert masked.stages[0].blocks.attn.decode is None
  return single, masked


@pytest.mark.parametrize("plan", list(PLANS))
def test_generate_with_single_query_equals_masked(plan):
  single, masked = _pair(PLANS[plan])
  lengths = [2, 7, 5]  # per-row cache indices; 7 + 12 runs past every window
  prompt = np.asarray(jax.random.randint(jax.random.key(4), (3, 7), 0, V), np.int32)
  a, la = generate(single, prompt, 12, prompt_lengths=lengths, return_logits=True)
  b, lb = generate(masked, prompt, 12, prompt_lengths=lengths, return_logits=True)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)


def test_scanned_decode_step_with_single_query_equals_masked():
  """model.scan's decode step: the window is traced (per-depth data of the scan)."""
  single, masked = _pair(WINDOWED)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, V)
  index = jnp.asarray([8, 5], jnp.int32)
  outs = []
  for m in (single, masked):
    cache = m.init_cache(2, 16)
    _, cache, _ = m(tokens, cache=cache, cache_index=jnp.zeros((2,), jnp.int32))
    logits, _, _ = m(tokens[:, :1], cache=cache, cache_index=index, unrolled=False)
    outs.append(logits)
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_engine_with_single_query_equals_masked():
  single, masked = _pair(WINDOWED)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, V, n).astype(np.int32) for n in (1, 6, 3, 9)]
  got = []
  for m in (single, masked):
    eng = Engine(m, slots=2, buckets=(4, 8, 16), chunk=3)
    got.append([c.tokens for c in eng.generate(prompts, max_new_tokens=8)])
  assert got[0] == got[1]


def test_split_weights_follow_an_updated_model():
  """`layer_weights.split_layers` reuses its last split only while the model holds the same arrays."""
  model, other = build(**WINDOWED), build(seed=7, **WINDOWED)
  prompt = np.asarray(jax.random.randint(jax.random.key(3), (2, 4), 0, V), np.int32)
  first = np.asarray(generate(model, prompt, 6, return_logits=True)[1])
  nnx.update(model, nnx.state(other))  # new arrays in the same structure
  np.testing.assert_array_equal(generate(model, prompt, 6, return_logits=True)[1],
                                generate(other, prompt, 6, return_logits=True)[1])
  assert not np.allclose(first, generate(model, prompt, 6, return_logits=True)[1])


def test_split_weights_are_kept_per_model_and_dropped_with_it():
  """Two models decoded in turn keep a split each; freeing a model drops its split."""
  import gc

  from recursive_lm.inference import layer_weights
  a, b = build(**WINDOWED), build(seed=7, **WINDOWED)
  pieces_a = layer_weights.split_layers(nnx.state(a))[1]
  before = len(layer_weights._last)
  pieces_b = layer_weights.split_layers(nnx.state(b))[1]
  assert len(layer_weights._last) == before + 1
  assert layer_weights.split_layers(nnx.state(a))[1] is pieces_a
  assert layer_weights.split_layers(nnx.state(b))[1] is pieces_b
  del b, pieces_b
  gc.collect()
  assert len(layer_weights._last) == before
  assert layer_weights.split_layers(nnx.state(a))[1] is pieces_a
