"""The one sampling rule of every decoder (`generate`, and every Engine program).

Row i of a batch draws with its own rule: argmax at temperature 0, otherwise
a draw from softmax(logits / temperature) among the top_k largest logits
(top_k > 0; ties at the k-th value kept), keyed by fold_in(key(seed), step)
where step is the index of the token within its request. A request's
tokens therefore depend on its seed, temperature and top_k alone, not on
which decoder ran it, which row it sat in or what ran beside it:
`generate(..., seed=s)` gives row i the seed s + i, which is what an Engine
built with seed s gives its i-th request.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_rows(logits, seeds, steps, temperature, top_k, max_top_k: int):
  """logits float [B, V] -> token ids int32 [B], each row with its own rule.

  Row i: argmax when temperature[i] == 0; else a draw from
  softmax(logits[i] / temperature[i]) keyed by fold_in(key(seeds[i]), steps[i]),
  among the top_k[i] largest logits when top_k[i] > 0 (ties at the k-th value
  kept). top_k[i] <= max_top_k (static).
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def drawn(logits):
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if max_top_k > 0:
      top = jax.lax.top_k(scaled, min(max_top_k, scaled.shape[-1]))[0]  # [B, K] descending
      kth = jnp.take_along_axis(top, jnp.clip(top_k - 1, 0, top.shape[-1] - 1)[:, None], axis=-1)
      scaled = jnp.where((top_k[:, None] > 0) & (scaled < kth), -jnp.inf, scaled)
    draw = jax.vmap(lambda s, j, l: jax.random.categorical(jax.random.fold_in(jax.random.key(s), j), l))
    return jnp.where(temperature > 0, draw(seeds, steps, scaled).astype(jnp.int32), greedy)

  # All-greedy steps (the common serving case) skip the top-k and the draws.
  return jax.lax.cond(jnp.any(temperature > 0), drawn, lambda _: greedy, logits)
