"""Few-loop self-speculation: the model cut to its first loops drafts, the full
depth verifies.

A round, for every slot at once (one jitted program, `decode`):

  1. draft: from the slot's last token t0 at position p, k tokens d1..dk, each
     by one call of the model cut after `draft_loops` loops of its repeated
     stage (`forward_draft`: the first effective layers, then the shared final
     norm and head, the readout the exits and the per-loop training losses
     use); each draft call writes the K/V of those first layers at its position;
  2. verify: ONE full-depth call over [t0, d1..dk] at positions p..p+k gives
     the full model's token v1..v(k+1) after each of them;
  3. accept the longest prefix with d_j == v_j, and the verifier's next token:
     the slot emits v1..v(n+1) (n accepted drafts), cut at its token budget and
     at EOS.

Why the output is exactly the plain decode's: v_j is what the full model
draws after t0, v1..v(j-1) -- the same prefix plain decoding would have
fed -- with the same rule and the same random key (token number s of a
request is drawn with fold_in(key(seed), s) in both), and only v's are
emitted. Drafts are drawn with the same key as the verifier at their token
number, so at temperature > 0 draft and verifier agree whenever the cut and
full distributions put the draw on the same token (a coupled draw); greedy
rows compare argmaxes. The emitted tokens are token-for-token those of plain
decoding up to float rounding of a (k+1)-token call against single-token
calls.

Cache rollback: the verify call wrote full-depth K/V at p..p+k for every
layer, over the draft's first-layer K/V. After accepting n drafts, the
positions p..p+n hold K/V of the emitted prefix; the slot's next round starts
at p+n+1 (cache_index is per row, so rows roll back independently). K/V at
p+n+1..p+k belong to rejected drafts: a query at position q only sees keys
at positions <= q and every round writes a position before any query reads
it, so they are never seen. The cache therefore needs k positions beyond
the engine's max_len (drafts of a row near its last token run past it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from recursive_lm.inference import exits
from recursive_lm.inference.sampling import sample_rows
from recursive_lm.model.walk import Hooks, walk


def draft_depth(model, draft_loops: int) -> int:
  """Effective layers the draft runs: through loop `draft_loops` of the
  repeated stage. Raises ValueError for a plan without loops, a recurrent plan
  or a count outside [1, loops - 1]."""
  if model.recurrent:
    raise ValueError("speculation needs a plan whose loops run from the KV cache without input injection; "
                     "the recurrent preset is not supported")
  bounds = exits.loop_boundaries(model.plan, f"speculate (draft_loops={draft_loops})")
  if not 1 <= int(draft_loops) <= len(bounds):
    raise ValueError(f"draft_loops={draft_loops} must lie in [1, {len(bounds)}] (the model has {len(bounds) + 1} "
                     "loops; the draft runs fewer than all)")
  return bounds[int(draft_loops) - 1] + 1


def forward_draft(model, tokens, cache, cache_index, depth: int):
  """tokens [B, T] -> (logits [B, T, V] float32, cache): the first `depth`
  effective layers (each writing its K/V at cache_index, per row [B]) and the
  readout: the walk (`model.walk`) over a prefix of the layers."""
  ctx, _ = model.context(tokens.shape[1], cache_index)
  x = model.embed(tokens, jnp.dtype(model.cfg.compute_dtype))
  x, cache, _, _ = walk(model, model.plan.layers()[:depth], x, ctx, cache, hooks=Hooks(model.loop_start))
  return model.readout(x), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "depth", "chunk", "max_top_k", "unrolled"),
                   donate_argnames=("cache",))
def decode(graphdef, state, cache, tokens, positions, seeds, steps, temperature, top_k, remaining, eos_id, *,
           k: int, depth: int, chunk: int, max_top_k: int, unrolled: bool = True):
  """Up to `chunk` speculation rounds of every slot (arguments as the engine's
  `_decode`; the cache holds at least max position + k + 1 positions).

  Returns (cache, drawn int32 [B, chunk * (k + 1)] with each slot's new tokens
  first and -1 after them, drafted int32 [B]: drafts proposed while the slot
  ran, accepted int32 [B]: drafts the verifier agreed with).
  """
  model = nnx.merge(graphdef, state)
  b = tokens.shape[0]
  rows = jnp.arange(b)
  width = chunk * (k + 1)
  draw = lambda logits, s: sample_rows(logits, seeds, s, temperature, top_k, max_top_k)

  def cond(carry):
    return (carry[0] < chunk) & jnp.any(carry[4])

  def body(carry):
    i, cache, tok, pos, alive, n_out, out, drafted, accepted = carry

    def draft_step(c, j):
      cache, t = c
      logits, cache = forward_draft(model, t[:, None], cache, pos + j, depth)
      d = draw(logits[:, -1], steps + n_out + j)
      return (cache, d), d

    (cache, _), drafts = jax.lax.scan(draft_step, (cache, tok), jnp.arange(k, dtype=jnp.int32))
    drafts = drafts.T  # [B, k]
    logits, cache, _ = model(jnp.concatenate([tok[:, None], drafts], 1), cache=cache, cache_index=pos,
                             unrolled=unrolled)
    ver = jnp.stack([draw(logits[:, j], steps + n_out + j) for j in range(k + 1)], 1)  # [B, k + 1]
    n_acc = jnp.sum(jnp.cumprod(drafts == ver[:, :k], axis=1), axis=1)  # [B]
    j = jnp.arange(k + 1)
    eos_at = jnp.argmax(jnp.concatenate([ver == eos_id, jnp.ones((b, 1), bool)], 1), axis=1)  # k + 1: none
    count = jnp.minimum(jnp.minimum(n_acc + 1, remaining - n_out), eos_at + 1)
    count = jnp.where(alive, count, 0)
    idx = jnp.where(j < count[:, None], n_out[:, None] + j, width)  # width: dropped
    out = out.at[rows[:, None], idx].set(ver, mode="drop")
    last = ver[rows, jnp.maximum(count - 1, 0)]
    tok, pos, n_out = jnp.where(alive, last, tok), pos + count, n_out + count
    drafted, accepted = drafted + jnp.where(alive, k, 0), accepted + jnp.where(alive, n_acc, 0)
    alive = alive & (n_out < remaining) & (last != eos_id)
    return i + 1, cache, tok, pos, alive, n_out, out, drafted, accepted

  zeros = jnp.zeros((b,), jnp.int32)
  carry = (jnp.int32(0), cache, tokens, positions, remaining > 0, zeros, jnp.full((b, width), -1, jnp.int32),
           zeros, zeros)
  _, cache, _, _, _, _, out, drafted, accepted = jax.lax.while_loop(cond, body, carry)
  return cache, out, drafted, accepted
