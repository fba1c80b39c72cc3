"""Loop re-embedding (model.reembed_tau; Grokked transformers), the proof
that a per-loop feature is one hook: the scan, the walk, decoding (plain,
with exits, the speculation draft) and the probes all run it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm.analysis import probes
from recursive_lm.inference import exits, generate
from recursive_lm.model.recursion import apply_layer
from test_decode import build, full_forward, prompt

CYCLE = dict(preset="middle_cycle", num_layers=6, repeats=2, lora_rank=2)


def by_hand(model, tokens, tau):
  """first layer, loop 0, re-embedding, loop 1, last layer, readout: written out."""
  ctx, _ = model.context(tokens.shape[1])
  x = model.embed(tokens, jnp.float32)
  table = model.embed.table[...]
  for layer in model.plan.layers():
    if layer.stage == 1 and layer.block == 0 and layer.repeat > 0:
      x = x + jax.nn.softmax(tau * (x @ table.T), axis=-1) @ table
    x, _, _ = apply_layer(model.stages[layer.stage], layer, x, ctx)
  return model.readout(x)


def test_scan_and_walk_equal_the_hand_computation():
  model = build(**CYCLE, **{"model.reembed_tau": 2.0})
  tokens = prompt(1, p=7)
  want = by_hand(model, tokens, 2.0)
  np.testing.assert_allclose(full_forward(model, tokens), want, rtol=1e-5, atol=1e-5)
  graphdef, state = nnx.split(model)
  walked = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, unrolled=True)[0])(state, tokens)
  np.testing.assert_allclose(walked, want, rtol=1e-5, atol=1e-5)
  plain = build(**CYCLE)  # the same weights without the hook differ: the hook really runs
  assert float(jnp.max(jnp.abs(full_forward(plain, tokens) - want))) > 1e-3
  hidden, _ = probes.residual_stream(model, tokens)
  np.testing.assert_allclose(model.readout(hidden[-1]), want, rtol=1e-5, atol=1e-5)


def test_gradients_of_scan_and_walk_agree():
  model = build(**CYCLE, **{"model.reembed_tau": 1.5})
  graphdef, state = nnx.split(model)
  tokens = prompt(2, p=7)
  loss = lambda s, u: jnp.mean(nnx.merge(graphdef, s)(tokens, unrolled=u)[0] ** 2)
  g_scan = jax.jit(jax.grad(lambda s: loss(s, False)))(state)
  g_walk = jax.jit(jax.grad(lambda s: loss(s, True)))(state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_scan, g_walk)


def test_decoding_runs_the_hook():
  model = build(**CYCLE, **{"model.reembed_tau": 2.0})
  toks, logits = generate(model, prompt(3), 4, return_logits=True)
  for j in range(4):  # each cached step's logits are the full forward's at that position
    seq = toks[:, :prompt(3).shape[1] + j]
    np.testing.assert_allclose(logits[:, j], full_forward(model, seq)[:, -1], rtol=1e-4, atol=1e-4)
  never = exits.ExitRule("confidence", 1.0)  # nobody exits: the exit walk is the model
  cache = model.init_cache(2, 8)
  got, _, ran = exits.forward_with_exits(model, toks[:, :4], cache, jnp.zeros((2,), jnp.int32), never)
  np.testing.assert_allclose(got, full_forward(model, toks[:, :4]), rtol=1e-5, atol=1e-5)


def test_plans_without_a_plain_loop_are_refused():
  for overrides, needle in (({"preset": "vanilla", "num_layers": 2}, "repeated stage"),
                            (dict(preset="recurrent", num_layers=6, repeats=2), "recurrent preset")):
    with pytest.raises(config_lib.ConfigError, match=needle) as e:
      config_lib.load(tiny_config(**overrides, **{"model.reembed_tau": 1.0}))
    assert str(e.value).startswith("model.reembed_tau=1.0") and "\n" not in str(e.value)
