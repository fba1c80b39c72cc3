"""Hand-written backwards against autodiff of the plain expressions: Dense's
`linear` and the blocked causal attention (GQA, sliding windows, uneven
blocks, bfloat16); the tied readout's single-row form against x @ table^T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recursive_lm.model import attention
from recursive_lm.model.layers import Embed, linear


def rand(shape, seed, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


@pytest.mark.parametrize("d_in,d_out", [(8, 24), (24, 8)])  # both transposition choices of the backward
def test_linear_equals_matmul_with_gradients(d_in, d_out):
  x, w, g = rand((2, 5, d_in), 0), rand((d_in, d_out), 1), rand((2, 5, d_out), 2)
  np.testing.assert_allclose(linear(x, w), x @ w, rtol=1e-6)
  ours = jax.grad(lambda x, w: jnp.vdot(linear(x, w), g), (0, 1))(x, w)
  ref = jax.grad(lambda x, w: jnp.vdot(x @ w, g), (0, 1))(x, w)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_linear_keeps_bfloat16():
  x, w = rand((3, 8), 0, jnp.bfloat16), rand((8, 4), 1, jnp.bfloat16)
  dx, dw = jax.grad(lambda x, w: linear(x, w).astype(jnp.float32).sum(), (0, 1))(x, w)
  assert linear(x, w).dtype == dx.dtype == dw.dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", [(1, 1, 12), (1, 12), (12,), (3, 1, 12), (1, 4, 12)])
def test_tied_readout_equals_x_times_table_transposed(shape):
  # A single row takes the table @ x form (a decode step at batch 1); more rows x @ table^T.
  embed = Embed(37, 12, 1.0, nnx.Rngs(0))
  x = rand(shape, 3)
  logits = jax.jit(embed.attend)(x)
  assert logits.shape == shape[:-1] + (37,)
  np.testing.assert_allclose(logits, np.asarray(x) @ np.asarray(embed.table[...]).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block,t", [(None, None), (5, 16), (4, 16)])
@pytest.mark.parametrize("window", [None, 0, 3])
def test_blocked_attention_equals_plain_with_gradients(monkeypatch, block, t, window):
  """Values and q/k/v gradients of `causal_attend_blocked` equal the autodiff of
  `attend` with keys = queries; default block at T = 2 blocks, and small blocks
  that do (16 = 4 x 4) and do not (5, 5, 5, 1) divide T."""
  if block is not None:
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", block)
  t = t or 2 * attention.CAUSAL_BLOCK
  q, k, v = rand((2, t, 2, 3, 4), 7), rand((2, t, 2, 4), 8), rand((2, t, 2, 4), 9)  # K 2 kv heads, G 3
  g = rand(q.shape, 10)
  pos = jnp.arange(t)
  blocked = lambda q, k, v: attention.causal_attend_blocked(q, k, v, pos, window)
  plain = lambda q, k, v: attention.attend(q, k, v, pos, pos, window)
  np.testing.assert_allclose(blocked(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-5)
  ours = jax.grad(lambda *a: jnp.vdot(blocked(*a), g), (0, 1, 2))(q, k, v)
  ref = jax.grad(lambda *a: jnp.vdot(plain(*a), g), (0, 1, 2))(q, k, v)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_blocked_attention_in_bfloat16_is_close_to_float32():
  t = 2 * attention.CAUSAL_BLOCK
  q, k, v = rand((1, t, 1, 2, 8), 1), rand((1, t, 1, 8), 2), rand((1, t, 1, 8), 3)
  pos = jnp.arange(t)
  f = lambda q, k, v: attention.causal_attend_blocked(q, k, v, pos).astype(jnp.float32).sum()
  ref = jax.grad(f, (0, 1, 2))(q, k, v)
  low = jax.grad(f, (0, 1, 2))(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  for a, b in zip(low, ref):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(a.astype(jnp.float32), b, rtol=0.05, atol=0.05)
