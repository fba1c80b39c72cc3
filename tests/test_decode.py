"""KV-cache decoding (recursive_lm.inference.generate) against full recomputation.

For every depth plan, greedy decoding with the cache must pick the same tokens
as re-running the full forward pass on the growing sequence and taking the
argmax, and the logits behind each cached step must match the full forward's
logits at that position. Parameters are perturbed first so that LoRA B != 0
and per-depth norms differ between depths (at init both would hide a
mixed-up depth slot).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm.inference import generate
from recursive_lm.inference import decode as decode_lib
from recursive_lm.model.layers import LoRAParam
from recursive_lm.model.transformer import Transformer

V, B, P, N = 61, 2, 4, 6

CASES = {
    "vanilla": dict(preset="vanilla", num_layers=2),
    "cycle": dict(preset="cycle", num_layers=4, repeats=2),
    "sequence": dict(preset="sequence", num_layers=4, repeats=2),
    "middle_cycle": dict(preset="middle_cycle", num_layers=4, repeats=2),
    "sandwich_per_depth_norms": dict(preset="sandwich", num_layers=4, per_depth_norms=True),
    "relaxed_cycle": dict(preset="cycle", num_layers=4, repeats=2, lora_rank=2),
    "relaxed_sequence": dict(preset="sequence", num_layers=4, repeats=2, lora_rank=3, per_depth_norms=True),
}


def _noisy(tree, std, seed):
  """tree + std * N(0, 1) noise, drawn with numpy (eager jax.random would compile per shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + jnp.asarray(std * rng.standard_normal(x.shape), x.dtype), tree)


def build(seed=1, lora_std=0.3, **overrides) -> Transformer:
  """A tiny model with every parameter perturbed (LoRA B by lora_std)."""
  cfg = config_lib.load(tiny_config(**overrides))
  graphdef, lora, rest = nnx.split(Transformer(cfg.model, nnx.Rngs(0)), LoRAParam, ...)
  return nnx.merge(graphdef, _noisy(lora, lora_std, seed + 100), _noisy(rest, 0.05, seed))


def full_forward(model, tokens):
  """Logits [B, T, V] of the ordinary (cache-free) forward pass."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, tokens)


def prompt(seed=0, b=B, p=P):
  return jax.random.randint(jax.random.key(seed), (b, p), 0, V, dtype=jnp.int32)


@pytest.mark.parametrize("case", list(CASES))
def test_cached_greedy_matches_full_recomputation(case):
  model = build(**CASES[case])
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
  toks, logits = generate(model, prompt(), N, return_logits=True)
  assert toks.dtype == jnp.int32 and toks.shape == (B, P + N)
  assert logits.shape == (B, N, V)
  np.testing.assert_array_equal(toks[:, :P], prompt())

  # The reference recomputes the whole sequence from scratch at every step,
  # without a cache. To compile it once, the growing sequence is padded to its
  # final length: under the causal mask (tested in test_model) padding after
  # position t does not change the logits at t.
  seq = np.zeros((B, P + N), np.int32)
  seq[:, :P] = prompt()
  for i in range(N):
    full = forward(state, jnp.asarray(seq))[:, P + i - 1]
    np.testing.assert_allclose(logits[:, i], full, rtol=1e-5, atol=1e-5, err_msg=f"{case}: step {i}")
    seq[:, P + i] = np.argmax(full, axis=-1)
    np.testing.assert_array_equal(toks[:, P + i], seq[:, P + i], err_msg=f"{case}: token {P + i}")
  np.testing.assert_array_equal(toks, seq)


def test_padded_reference_is_the_growing_sequence():
  """The padded reference above equals literally re-running on the unpadded prefix."""
  model = build(**CASES["relaxed_cycle"])
  toks = generate(model, prompt(), N)
  padded = full_forward(model, toks)
  for t in (P, P + N - 1):
    np.testing.assert_allclose(full_forward(model, toks[:, :t])[:, -1], padded[:, t - 1], rtol=1e-5, atol=1e-5)


def test_relaxed_lora_matters():
  """The relaxed case above is only a test of the adapters if they change the output."""
  relaxed = build(**CASES["relaxed_cycle"])
  tied = build(lora_std=0.0, **CASES["relaxed_cycle"])
  a, b = full_forward(relaxed, prompt()), full_forward(tied, prompt())
  assert float(jnp.max(jnp.abs(a - b))) > 1e-2


def test_edge_lengths_and_errors():
  model = build(**CASES["cycle"])
  p = prompt()
  np.testing.assert_array_equal(generate(model, p, 0), p)
  one = generate(model, p, 1)  # prefill only, no decode step
  assert one.shape == (B, P + 1)
  np.testing.assert_array_equal(one, generate(model, p, 3)[:, :P + 1])
  # The cache spans prompt + new tokens and may not exceed max_seq_len (32 in tiny_config).
  assert generate(model, prompt(p=30), 2).shape == (B, 32)
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(model, prompt(p=30), 3)
  with pytest.raises(ValueError, match="empty"):
    generate(model, jnp.zeros((B, 0), jnp.int32), 3)
  with pytest.raises(ValueError, match="vocab_size"):
    generate(model, jnp.full((B, 2), V, jnp.int32), 3)
  with pytest.raises(ValueError, match="temperature"):
    generate(model, p, 3, temperature=-1.0)


def test_sampling():
  model = build(**CASES["relaxed_cycle"])
  p = prompt()
  greedy = generate(model, p, N)
  # top_k=1 keeps only the argmax, whatever the temperature.
  np.testing.assert_array_equal(generate(model, p, N, temperature=1.5, top_k=1, seed=3), greedy)
  # Reproducible from the seed; different seeds give different draws at a high temperature.
  a = generate(model, p, N, temperature=2.0, seed=7)
  np.testing.assert_array_equal(a, generate(model, p, N, temperature=2.0, seed=7))
  draws = {tuple(np.asarray(generate(model, p, N, temperature=2.0, seed=s)).ravel()) for s in range(4)}
  assert len(draws) > 1
  # With top_k, every drawn token is among the k largest logits of its step.
  k = 3
  toks, logits = generate(model, p, N, temperature=5.0, top_k=k, seed=11, return_logits=True)
  top = np.argsort(-np.asarray(logits), axis=-1)[..., :k]  # [B, N, k]
  new = np.asarray(toks[:, P:])
  assert np.all((top == new[..., None]).any(-1)), (new, top)


def test_compiled_once_per_shape():
  model = build(**CASES["cycle"])
  generate(model, prompt(), N)
  before = decode_lib._generate._cache_size()
  generate(model, prompt(seed=5), N)
  generate(build(seed=2, **CASES["cycle"]), prompt(), N)  # same structure, other weights
  assert decode_lib._generate._cache_size() == before


@pytest.mark.parametrize("sharing", ["none", "recursion"])
def test_prompts_of_different_lengths_decode_as_alone(sharing):
  """Right-padded prompts of lengths 1, 5 and 17 in one batch: each row gets
  the greedy tokens (and logits) it gets alone; a tied plan with per-depth LoRA
  and sliding windows (local and global layers)."""
  model = build(preset="cycle", num_layers=4, repeats=2, lora_rank=2, **{
      "model.sliding_window": 4, "model.global_every": 2, "model.rope_base_local": 100.0,
      "model.kv_sharing": sharing})
  lengths = [1, 5, 17]
  rng = np.random.default_rng(5)
  padded = np.full((3, 17), 7, np.int32)  # pad id 7: its value must not matter
  for i, n in enumerate(lengths):
    padded[i, :n] = rng.integers(0, V, n)
  toks, logits = generate(model, padded, N, return_logits=True, prompt_lengths=lengths)
  assert toks.shape == (3, 17 + N)
  for i, n in enumerate(lengths):
    alone, alone_logits = generate(model, padded[i:i + 1, :n], N, return_logits=True)
    np.testing.assert_array_equal(toks[i, :n + N], alone[0], err_msg=f"row {i} (length {n})")
    assert (np.asarray(toks[i, n + N:]) == 0).all()
    np.testing.assert_allclose(logits[i], alone_logits[0], rtol=1e-5, atol=1e-5)


def test_per_row_cache_index_equals_rows_alone():
  """One forward call with rows at different cache positions equals each row's own call."""
  model = build(preset="cycle", num_layers=4, repeats=2, lora_rank=2, **{"model.sliding_window": 3})
  seq = jnp.asarray(np.random.default_rng(6).integers(0, V, (2, 9)), jnp.int32)
  cache = model.init_cache(2, 12)
  _, cache, _ = model(seq[:, :8], cache=cache, cache_index=jnp.zeros((2,), jnp.int32))
  starts = jnp.asarray([3, 7], jnp.int32)  # row 0 rewinds to position 3, row 1 continues at 7
  step = jnp.stack([seq[0, 3:5], seq[1, 7:9]])
  logits, _, _ = model(step, cache=cache, cache_index=starts)
  for r, s in enumerate([3, 7]):
    row_cache = [jax.tree.map(lambda a: a[:, r:r + 1], c) for c in cache]
    alone, _, _ = model(step[r:r + 1], cache=row_cache, cache_index=jnp.int32(s))
    np.testing.assert_allclose(logits[r], alone[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[1], full_forward(model, seq)[1, 7:9], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths,needle", [([1, 0], r"\[1, 4\]"), ([1, 5], r"\[1, 4\]"), ([2], "2 ints")])
def test_bad_prompt_lengths_are_rejected(lengths, needle):
  with pytest.raises(ValueError, match=needle):
    generate(build(), np.zeros((2, 4), np.int32), 2, prompt_lengths=lengths)


def _first(row, token):
  hits = np.flatnonzero(row == token)
  return int(hits[0]) if hits.size else None


def test_generation_stops_at_eos():
  """With eos_id a row is cut after its first EOS (the rest EOS, the tokens before as without it),
  and once every row has stopped the model is no longer run (zero logits)."""
  model = build(**CASES["relaxed_cycle"])
  n, kw = 10, dict(temperature=2.0, seed=3, return_logits=True)
  for p in (prompt(seed=4), prompt(seed=4, b=1)):
    free, free_logits = (np.asarray(x) for x in generate(model, p, n, **kw))
    eos = int(free[0, P + 3])  # a token row 0 draws at step 3 or earlier
    toks, logits = (np.asarray(x) for x in generate(model, p, n, eos_id=eos, **kw))
    ends = []
    for r in range(p.shape[0]):
      j = _first(free[r, P:], eos)
      ends.append(n - 1 if j is None else j)
      np.testing.assert_array_equal(toks[r, :P + ends[-1] + 1], free[r, :P + ends[-1] + 1])
      assert (toks[r, P + ends[-1] + 1:] == eos).all()
      np.testing.assert_allclose(logits[r, :ends[-1] + 1], free_logits[r, :ends[-1] + 1], rtol=1e-5, atol=1e-5)
    last = max(ends)  # the step at which the last row stopped
    assert (logits[:, last + 1:] == 0).all()
    if p.shape[0] == 1:
      assert last < n - 1  # the single row stopped early: later steps really were skipped
  with pytest.raises(ValueError, match="eos_id"):
    generate(model, prompt(), 3, eos_id=V)
