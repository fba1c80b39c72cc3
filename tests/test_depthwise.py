"""Continuous depth-wise batching (recursive_lm.inference.depthwise).

References: the per-depth layers of the model (`apply_layer`), plain greedy
`generate` (the scanned model) with exits off, and the per-token exits of
`exits.forward_with_exits` run one request at a time with exits forced by a
deterministic rule. Rows are put at different loop indices by admitting
requests at ticks that are not multiples of the loop count.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.inference import depthwise, generate
from recursive_lm.inference.engine import Engine
from recursive_lm.model.recursion import apply_layer, layer_modules

from test_decode import V, build

WINDOWED = dict(preset="cycle", num_layers=6, repeats=3, lora_rank=2, **{
    "model.sliding_window": 4, "model.global_every": 2, "model.rope_base_local": 100.0})
MIDDLE = dict(preset="middle_cycle", num_layers=8, repeats=3, lora_rank=2, per_depth_norms=True,
              **{"model.qk_norm": True, "model.sliding_window": 3, "model.global_every": 3})


class ExitByPosition(NamedTuple):
  """Exits the token at position p after loop 1 + p % 3 (with 3 loops: after
  loop 1, after loop 2, or not at all): the same exits whatever slot or batch
  a request runs in."""
  kind: str = "position"

  def decide(self, logp, prev, loop, positions):
    return jnp.asarray(loop) >= 1 + positions % 3


def _prompts(lengths, seed=5):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, V, n).astype(np.int32) for n in lengths]


def _run(engine, prompts, budgets, ticks=None):
  """Serve prompts with per-request budgets; ticks: depth-wise steps per device
  call (not a multiple of the loops, so requests are admitted mid-loop of the others)."""
  if ticks is not None:
    engine.depthwise.ticks = ticks
  for i, (p, n) in enumerate(zip(prompts, budgets)):
    engine.submit(p, max_new_tokens=n, id=i)
  return {c.id: c for c in engine.stream()}


def test_row_adapters_equal_the_depth_slots():
  """Each row through its own depth slot (LoRA, per-depth norms incl. q/k norms)
  in one batched call gives what the per-depth layer gives that row alone."""
  model = build(preset="cycle", num_layers=6, repeats=3, lora_rank=2, per_depth_norms=True,
                **{"model.qk_norm": True, "model.post_norms": True})
  stage, layers = model.stages[0], model.plan.stage_layers(0)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3, 42)), jnp.float32)
  ctx, _ = model.context(3)
  for block in (0, 1):
    idx = np.asarray([4, 0, 2, 2, 0]) + block  # cycle order: slot = repeat * 2 + block
    b_mod = layer_modules(stage, layers[block])[0]
    got, _, _ = b_mod(x, depthwise.row_slot(stage, jnp.asarray(idx)), ctx, None)
    for r, i in enumerate(idx):
      want, _, _ = apply_layer(stage, layers[i], x[r:r + 1], ctx, None)
      np.testing.assert_allclose(got[r:r + 1], want, rtol=1e-5, atol=1e-5)
  # The slots really differ (a row given another depth's slot would be caught).
  a, _, _ = apply_layer(stage, layers[0], x, ctx, None)
  b, _, _ = apply_layer(stage, layers[2], x, ctx, None)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


@pytest.mark.parametrize("case", ["windowed", "middle"])
def test_exits_off_equals_generate(case):
  """Every token runs all loops: greedy tokens of plain decoding, for prompts of
  different lengths admitted while other slots are mid-loop."""
  model = build(**(WINDOWED if case == "windowed" else MIDDLE))
  lengths, budgets = [1, 5, 17, 3, 9, 2], [6, 2, 9, 4, 5, 7]
  prompts = _prompts(lengths)
  got = _run(Engine(model, slots=3, buckets=(4, 8, 16, 32), depthwise=True), prompts, budgets, ticks=4)
  padded = np.zeros((len(prompts), max(lengths)), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :p.size] = p
  ref = np.asarray(generate(model, padded, max(budgets), prompt_lengths=lengths))
  for i, p in enumerate(prompts):
    np.testing.assert_array_equal(got[i].tokens, ref[i, p.size:p.size + budgets[i]], err_msg=f"request {i}")


@pytest.mark.parametrize("case", ["windowed", "middle"])
def test_forced_exits_equal_each_request_alone(case):
  """With exits forced by position, depth-wise batching gives every request the
  tokens and exit loops that `exits.forward_with_exits` gives it alone."""
  model = build(**(WINDOWED if case == "windowed" else MIDDLE))
  lengths, budgets = [2, 7, 4, 11, 3], [6, 8, 5, 7, 6]
  prompts = _prompts(lengths, seed=3)
  rule = ExitByPosition()
  batched = _run(Engine(model, slots=3, exit=rule, depthwise=True, chunk=2), prompts, budgets)
  for i, p in enumerate(prompts):
    alone = Engine(model, slots=1, exit=rule).generate([p], max_new_tokens=budgets[i])[0]
    assert batched[i].tokens == alone.tokens, i
    assert batched[i].exit_loops == alone.exit_loops, i
  loops = np.concatenate([c.exit_loops for c in batched.values()])
  assert set(loops.tolist()) == {1, 2, 3}
  # The exits change the tokens (a missing exit or fill would be seen).
  full = _run(Engine(model, slots=3, depthwise=True), prompts, budgets)
  assert any(full[i].tokens != batched[i].tokens for i in full)


def test_confidence_exits_batch_like_alone():
  """A confidence threshold that splits the tokens: each request's tokens and
  exit loops are the same depth-wise batched (rows exit at their own loop and
  re-enter at once) as alone, and as the gated exits engine gives them."""
  model = build(**WINDOWED)
  prompts = _prompts([2, 7, 4, 11, 3], seed=3)
  kw = dict(max_new_tokens=6)
  batched = Engine(model, slots=3, exit="confidence:0.1", depthwise=True, chunk=2).generate(prompts, **kw)
  gated = Engine(model, slots=3, exit="confidence:0.1").generate(prompts, **kw)
  for b, g in zip(batched, gated):
    assert b.tokens == g.tokens and b.exit_loops == g.exit_loops
  assert set(np.concatenate([c.exit_loops for c in batched]).tolist()) == {1, 2, 3}


def test_recurrent_plan_equals_generate():
  """Prelude / core (input injection at every loop) / coda."""
  model = build(preset="recurrent", num_layers=6, repeats=2, **{"model.plan.prelude": 1, "model.plan.coda": 1})
  prompts = _prompts([3, 6, 2, 5])
  budgets = [5, 3, 6, 4]
  got = _run(Engine(model, slots=2, depthwise=True), prompts, budgets, ticks=3)
  for i, p in enumerate(prompts):
    ref = np.asarray(generate(model, p[None], budgets[i]))[0, p.size:]
    np.testing.assert_array_equal(got[i].tokens, ref, err_msg=f"request {i}")


def test_plans_it_cannot_batch_by_depth():
  for kw, needle in ((dict(preset="vanilla", num_layers=2), "repeated stage"),
                     (dict(preset="sequence", num_layers=4, repeats=2), "cycle order"),
                     (dict(preset="cycle", num_layers=4, repeats=2, **{"model.kv_sharing": "recursion"}),
                      "kv_sharing")):
    with pytest.raises(ValueError, match=needle):
      Engine(build(**kw), depthwise=True)


def test_sampling_draws_what_the_plain_engine_draws():
  """Token j of a request is drawn with its seed and j, whatever the decode:
  temperature / top-k sampling gives the plain engine's tokens."""
  model = build(**WINDOWED)
  prompts = _prompts([3, 8, 5, 2], seed=7)
  kw = dict(max_new_tokens=7, temperature=1.3, top_k=5)
  plain = Engine(model, slots=2, max_top_k=8).generate(prompts, **kw)
  deep = Engine(model, slots=2, max_top_k=8, depthwise=True, chunk=3).generate(prompts, **kw)
  assert [c.tokens for c in deep] == [c.tokens for c in plain]
