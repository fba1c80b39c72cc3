"""Recurrent depth (Huginn, Geiping et al. 2025): what a core iteration adds to
the plain stage runner, the input injection and the initial state.

The `recurrent` plan runs prelude -> core x r -> coda. The prelude output e
[B, T, D] is injected into the state s [B, T, D] at the start of every core
iteration (model.recurrent.injection):

  concat   s <- W [s; e]                        W: [2D, D] (Huginn's adapter)
  add      s <- s + e
  parcae   s <- a * s + delta * (e @ B)         delta = softplus(dt), a = exp(-delta * exp(A_log))

parcae's a lies in (0, 1) per channel, so the injection map contracts s
whatever its parameters (spectral radius < 1 by construction); A_log starts at
0 and dt at log(e - 1), i.e. delta = 1 and a = exp(-1) on every channel.

`draw` gives a training step its loop count (model.recurrent.sample; one
per row with model.recurrent.per_sequence) and initial-state key from (seed, step).

The initial state (model.recurrent.init_state) is Huginn's truncated normal
with std sqrt(2 / (5 D)) (`normal`, drawn from a key the caller passes), zeros,
or e itself (`prelude`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recursive_lm import axes
from recursive_lm.config import ModelConfig, RecurrentConfig
from recursive_lm.model import kernels
from recursive_lm.model.layers import Dense, NormParam


class Injection(nnx.Module):
  """The input injection of one recurrent core: (s, e) [B, T, D] -> s [B, T, D]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, pd = cfg.d_model, jnp.dtype(cfg.param_dtype)
    self.kind = cfg.recurrent.injection
    proj = a_log = dt = None
    if self.kind == "concat":
      proj = Dense(2 * d, d, axes.MLP, axes.EMBED, (2 * d)**-0.5, rngs, pd, kernels.dense_kernel(cfg))
    elif self.kind == "parcae":
      proj = Dense(d, d, axes.MLP, axes.EMBED, d**-0.5, rngs, pd, kernels.dense_kernel(cfg))
      # Per-channel rates: like norm scales, not weight-decayed (NormParam).
      a_log = NormParam(jnp.zeros((d,), pd), out_sharding=(axes.EMBED,))
      dt = NormParam(jnp.full((d,), math.log(math.e - 1.0), pd), out_sharding=(axes.EMBED,))
    self.proj, self.a_log, self.dt = nnx.data(proj), nnx.data(a_log), nnx.data(dt)

  def __call__(self, s: jax.Array, e: jax.Array) -> jax.Array:
    if self.kind == "add":
      return s + e
    if self.kind == "concat":
      return self.proj(jnp.concatenate([s, e], axis=-1))
    delta = jax.nn.softplus(self.dt[...].astype(jnp.float32))
    decay = jnp.exp(-delta * jnp.exp(self.a_log[...].astype(jnp.float32)))
    return (decay * s.astype(jnp.float32) + delta * self.proj(e).astype(jnp.float32)).astype(s.dtype)

  def decay(self) -> jax.Array | None:
    """parcae: the per-channel factor a [D] applied to s (all in (0, 1)); None otherwise."""
    if self.kind != "parcae":
      return None
    return jnp.exp(-jax.nn.softplus(self.dt[...]) * jnp.exp(self.a_log[...]))


def initial_state(kind: str, e: jax.Array, key: jax.Array | None, positions: jax.Array) -> jax.Array:
  """The core's state before its first iteration, shaped like e [B, T, D].

  normal: truncated normal (+-3 std), std sqrt(2 / (5 D)), drawn per token
  position from fold_in(key, position) (key None: a fixed key 0, so that
  evaluation is deterministic). positions [T] or [B, T]: a token's state
  depends on its position only, so KV-cache decoding in chunks sees the
  states of the full forward pass (rows at the same position share it).
  """
  if kind == "zeros":
    return jnp.zeros_like(e)
  if kind == "prelude":
    return e
  d = e.shape[-1]
  key = jax.random.key(0) if key is None else key
  draw = lambda p: jax.random.truncated_normal(jax.random.fold_in(key, p), -3.0, 3.0, (d,), jnp.float32)
  noise = jax.vmap(draw)(positions.reshape(-1)).reshape(positions.shape + (d,))
  return jnp.broadcast_to(math.sqrt(2.0 / (5.0 * d)) * noise, e.shape).astype(e.dtype)


def draw(rc: RecurrentConfig, repeats: int, seed: int, step: int, batch: int = 1) -> dict[str, np.ndarray]:
  """The training step's recurrent inputs, a function of (seed, step) only so
  that a resumed run draws what the uninterrupted run drew:

    loops  the core's loop count: int32 [] for the whole batch, or with
           rc.per_sequence int32 [batch], one independent draw per row
           fixed              the plan's repeats
           poisson_lognormal  tau ~ N(log(mean) - sigma^2 / 2, sigma), loops = Poisson(e^tau) + 1
                              (Huginn; mean 0: the plan's repeats)
           uniform            uniform in [min_loops, max_loops]
           the sampled kinds are clipped to [min_loops, max_loops].
           With a curriculum, fixed and poisson_lognormal use curriculum_mean(step)
           as their mean (fixed: rounded half up).
    key    uint32 [2]: key data of the random initial state (`initial_state`).
  """
  rng = np.random.default_rng([seed, step, 0x6C6F6F70])  # 'loop': a stream of its own
  key = rng.integers(0, 2**32, 2, dtype=np.uint32)
  shape = (batch,) if rc.per_sequence else ()
  if rc.sample == "fixed":
    loops = repeats if rc.curriculum == "none" else max(1, math.floor(curriculum_mean(rc, repeats, step) + 0.5))
    loops = np.full(shape, loops)
  elif rc.sample == "uniform":
    loops = rng.integers(rc.min_loops, rc.max_loops + 1, shape)
  else:
    mean, sigma = curriculum_mean(rc, repeats, step), rc.sigma
    tau = rng.normal(math.log(mean) - sigma**2 / 2, sigma, shape)
    loops = np.clip(rng.poisson(np.exp(tau)) + 1, rc.min_loops, rc.max_loops)
  return {"loops": np.asarray(loops, np.int32), "key": key}


def curriculum_mean(rc: RecurrentConfig, repeats: int, step: int) -> float:
  """The mean loop count r-bar at train step `step` (model.recurrent.curriculum).

  With target m = rc.mean (0: the plan's repeats), start m0 = rc.min_loops and
  x = min(step / rc.curriculum_steps, 1):
    none    m
    linear  m0 + (m - m0) x
    1-sqrt  m0 + (m - m0) (1 - sqrt(1 - x))   (slow at first, steep at the end:
            most steps run few loops, as the 1-sqrt cooldown keeps the LR high)
  """
  target = rc.mean or repeats
  if rc.curriculum == "none":
    return float(target)
  x = min(step / rc.curriculum_steps, 1.0)
  f = x if rc.curriculum == "linear" else 1.0 - math.sqrt(1.0 - x)
  return rc.min_loops + (target - rc.min_loops) * f


def loop_start(model, ctx, key: jax.Array | None = None):
  """The recurrent core's loop-start hook for the walk (`model.walk`): at
  loop 0 the stream (the prelude output e) is replaced by the initial state;
  every loop then starts by injecting e. inject(x, j, state): with
  state["frozen"] bool [B] (rows an exit froze), those rows keep x (their
  state is every later layer's input)."""
  e = {}

  def inject(x, j, state=None):
    if j == 0:
      e["e"] = x
      x = initial_state(model.cfg.recurrent.init_state, x, key, ctx.positions)
    new = model.injection(x, e["e"])
    frozen = None if state is None else state["frozen"]
    return new if frozen is None else jnp.where(frozen[:, None, None], x, new)

  return inject
