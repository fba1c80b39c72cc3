"""Per-token early exit (recursive_lm.inference.exits) and the engine with exits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.inference import generate
from recursive_lm.inference.engine import Engine
from recursive_lm.inference import exits
from recursive_lm.inference.exits import ExitRule, forward_with_exits, loop_boundaries, parse_exit
from recursive_lm.model.recursion import apply_layer

from test_decode import V, build

LOOPED = dict(preset="cycle", num_layers=6, repeats=3, lora_rank=2, **{
    "model.sliding_window": 4, "model.global_every": 2, "model.rope_base_local": 100.0})
NEVER, ALWAYS = ExitRule("confidence", 1.0), ExitRule("confidence", 1e-9)


def _step_inputs(model, seed=0):
  """A cache prefilled with 5 tokens per row (2 rows), the next token of each row and their positions."""
  seq = jnp.asarray(np.random.default_rng(seed).integers(0, V, (2, 6)), jnp.int32)
  cache = model.init_cache(2, 8)
  _, cache, _ = model(seq[:, :5], cache=cache, cache_index=jnp.zeros((2,), jnp.int32))
  return seq[:, 5:6], cache, jnp.asarray([5, 5], jnp.int32)


@pytest.mark.parametrize("sharing", ["none", "recursion"])
def test_without_an_exit_it_is_the_model(sharing):
  model = build(**LOOPED, **{"model.kv_sharing": sharing})
  assert loop_boundaries(model.plan) == (1, 3)  # after loops 1 and 2 of 3
  tok, cache, pos = _step_inputs(model)
  want, want_cache, _ = model(tok, cache=cache, cache_index=pos)
  got, got_cache, loops = jax.jit(lambda c: forward_with_exits(model, tok, c, pos, NEVER))(cache)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got_cache, want_cache)
  assert loops.tolist() == [3, 3]


@pytest.mark.parametrize("sharing", ["none", "recursion"])
def test_exit_after_the_first_loop(sharing):
  """Every row exits after loop 1: logits are the readout of the state after
  layers 0-1, and the later layers' K/V (written by their K/V projections
  alone, all rows having exited) are those the full layers compute from that exit state."""
  model = build(**LOOPED, **{"model.kv_sharing": sharing})
  tok, cache, pos = _step_inputs(model)
  got, got_cache, loops = jax.jit(lambda c: forward_with_exits(model, tok, c, pos, ALWAYS))(cache)
  assert loops.tolist() == [1, 1]
  ctx, _ = model.context(1, pos)
  x = model.embed(tok, jnp.float32)
  layers = model.plan.layers()
  stage = model.stages[0]
  for layer in layers[:2]:
    x, entry, _ = apply_layer(stage, layer, x, ctx, model.kv.read(cache, layer))
    cache = model.kv.write(cache, layer, entry)
  np.testing.assert_allclose(got, model.readout(x), rtol=1e-5, atol=1e-5)
  for layer in layers[2:]:
    _, entry, _ = apply_layer(stage, layer, x, ctx, model.kv.read(cache, layer))
    cache = model.kv.write(cache, layer, entry)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got_cache, cache)
  # The exit changes the prediction (the test would not see a missing exit otherwise).
  full, _, _ = model(tok, *_step_inputs(model)[1:2], cache_index=pos)
  assert float(jnp.max(jnp.abs(full - got))) > 1e-3


def test_engine_with_exits_batches_like_alone():
  """Rows exit on their own (a confidence threshold that splits the tokens): the
  batched engine gives every request the tokens and exit loops it gets alone."""
  model = build(**LOOPED)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, V, n).astype(np.int32) for n in (2, 7, 4, 11, 3)]
  kw = dict(max_new_tokens=6)
  free = Engine(model, slots=2, exit="confidence:1.0").generate(prompts, **kw)
  ref = [np.asarray(generate(model, p[None], 6))[0, p.size:].tolist() for p in prompts]
  assert [c.tokens for c in free] == ref and all(c.mean_exit_loop == 3 for c in free)
  loops = np.concatenate([c.exit_loops for c in Engine(model, slots=2, exit="kl:1e9").generate(prompts, **kw)])
  assert (loops == 2).all()  # kl never exits after loop 1 (nothing to compare), always after loop 2
  rule = "confidence:0.1"  # exits after loop 1, 2 and none, on this model
  batched = Engine(model, slots=3, exit=rule, chunk=4).generate(prompts, **kw)
  alone = [Engine(model, slots=1, exit=rule).generate([p], **kw)[0] for p in prompts]
  for b, a in zip(batched, alone):
    assert b.tokens == a.tokens and b.exit_loops == a.exit_loops
  every = np.concatenate([c.exit_loops for c in batched])
  assert set(every.tolist()) == {1, 2, 3}, every  # the threshold really splits the tokens


def test_bad_exit_settings():
  for spec in ("confidence:0", "confidence:1.5", "kl:0", "kl:x", "soon:1", "confidence"):
    with pytest.raises(ValueError, match="exit="):
      parse_exit(spec)
  assert parse_exit("none") is None and parse_exit("kl:0.01") == ExitRule("kl", 0.01)
  with pytest.raises(ValueError, match="repeated stage"):
    Engine(build(preset="vanilla", num_layers=2), exit="confidence:0.9")


def test_teacher_forced_exits_equal_decoding_with_exits():
  """The whole-sequence forward with per-position exits gives, at every
  position, the logits and exit loop of decoding the sequence token by token
  with `forward_with_exits` (exited tokens' later K/V from their exit state)."""
  model = build(**LOOPED)
  seq = jnp.asarray(np.random.default_rng(4).integers(0, V, (2, 7)), jnp.int32)
  rule = ExitRule("confidence", 0.1)
  logits, loops = jax.jit(lambda t: exits.teacher_forced(model, t, rule))(seq)
  cache = model.init_cache(2, 8)
  step = jax.jit(lambda t, c, i: forward_with_exits(model, t, c, i, rule))
  for p in range(seq.shape[1]):
    want, cache, want_loops = step(seq[:, p:p + 1], cache, jnp.full((2,), p, jnp.int32))
    np.testing.assert_allclose(logits[:, p], want[:, 0], rtol=1e-4, atol=1e-4)
    assert loops[:, p].tolist() == want_loops.tolist(), p
  assert set(np.asarray(loops).ravel().tolist()) == {1, 2, 3}
