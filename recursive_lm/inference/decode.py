"""Autoregressive decoding with the KV cache.

`generate` runs one jitted program per (graphdef, shapes, sampling mode):

  1. prefill: the whole prompt [B, P] in one forward call writes cache slots
     [0, P) and gives the logits that choose token P;
  2. decode: a `jax.lax.fori_loop` feeds each row's next token at its own
     cache index P_row + i, each call reading the whole cache and writing one slot.
     The step walks the depth layer by layer (`Transformer(unrolled=True)`),
     whatever model.scan says: with the weights split per layer
     (`layer_weights`) it reads every weight in place, where a scan slices
     (copies) each layer's weights and cache out of their stacks at every step.

The prefill reads out only each row's last prompt position (`logits_at`).
The model's state enters the jitted function as arrays (nnx.split outside,
nnx.merge inside), so repeated calls with the same model structure and shapes
reuse the compiled program. Prompts of different lengths are right-padded
to one length P; every row then runs at its own positions (the model takes
one cache index per row), so a row gets the same tokens as it would alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recursive_lm.inference import layer_weights
from recursive_lm.inference.sampling import sample_rows


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "max_new_tokens", "top_k", "return_logits",
                                             "eos_id", "loops"))
def _generate(graphdef, layout, weights, prompt, lengths, seeds, temperature, *, max_new_tokens: int, top_k: int,
              return_logits: bool, eos_id: int | None = None, loops: int | None = None):
  # The weights arrive split per layer (`layer_weights`); each step restacks them, and its
  # layer-by-layer walk reads them in place (no per-step copy of every weight).
  model = lambda: nnx.merge(graphdef, layer_weights.join_layers(layout, weights))
  b, p = prompt.shape
  n = max_new_tokens
  rows = jnp.arange(b)
  temps, top_ks = jnp.full((b,), temperature, jnp.float32), jnp.full((b,), top_k, jnp.int32)
  # Token s of row i is drawn with fold_in(key(seeds[i]), s): the Engine's rule (`sampling`).
  draw = lambda logits, step: sample_rows(logits, seeds, jnp.full((b,), step, jnp.int32), temps, top_ks, top_k)
  run = {} if loops is None else {"loops": loops}  # a recurrent core's count (none: the plan's)
  cache = model().init_cache(b, p + n, **run)
  # Row i: its prompt, then N new tokens (EOS once it stopped: skipped steps keep it), then zeros.
  idx = jnp.arange(p + n)
  tokens = jnp.concatenate([prompt, jnp.zeros((b, n), jnp.int32)], axis=1)
  after = jnp.where(idx < (lengths + n)[:, None], eos_id or 0, 0)
  tokens = jnp.where(idx < lengths[:, None], tokens, after)

  # Prefill: the right-padded prompts in one call; row i's position lengths[i] - 1 predicts its first token.
  # The padding fills cache slots that a row overwrites (at its own position) before its queries can see them.
  # Layer by layer like the decode steps: a scan would first copy every layer's weights into one stack.
  logits, cache, _ = model()(prompt, cache=cache, cache_index=jnp.zeros((b,), jnp.int32), logits_at=lengths - 1,
                             unrolled=True, **run)
  last = logits[:, 0]
  first = draw(last, 0)
  tokens = tokens.at[rows, lengths].set(first)
  done = (first == eos_id) if eos_id is not None else jnp.zeros((b,), bool)  # rows past their EOS
  seen = jnp.zeros((b, n, last.shape[-1]), jnp.float32) if return_logits else None
  if return_logits:
    seen = seen.at[:, 0].set(last)

  def body(i, carry):
    tokens, cache, seen, done = carry
    pos = lengths + i  # [B]: each row's token at `pos` goes in; it predicts pos + 1
    tok = tokens[rows, pos][:, None]
    # The cache travels as per-layer pieces, updated in place (see layer_weights).
    logits, cache, _ = model()(tok, cache=layer_weights.restack(cache), cache_index=pos, unrolled=True, **run)
    cache = layer_weights.unstack(cache)
    nxt = draw(logits[:, -1], i + 1)
    if eos_id is not None:  # a finished row keeps emitting EOS
      nxt = jnp.where(done, eos_id, nxt)
      done = done | (nxt == eos_id)
    tokens = tokens.at[rows, pos + 1].set(nxt)
    if return_logits:
      seen = jax.lax.dynamic_update_slice_in_dim(seen, logits[:, -1:], i + 1, axis=1)
    return tokens, cache, seen, done

  step = body
  if eos_id is not None:  # once every row is done, the remaining steps skip the model
    step = lambda i, carry: jax.lax.cond(jnp.all(carry[3]), lambda c: c, functools.partial(body, i), carry)
  tokens, _, seen, _ = jax.lax.fori_loop(0, n - 1, step, (tokens, layer_weights.unstack(cache), seen, done))
  return (tokens, seen) if return_logits else tokens


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             return_logits: bool = False, prompt_lengths=None, eos_id: int | None = None, loops: int | None = None,
             matmul: str = "xla"):
  """Continue each prompt by `max_new_tokens` tokens.

  model: a `Transformer`; prompt_ids: int [B, P] with P >= 1.
  prompt_lengths: int [B] for prompts of different lengths, right-padded in
  prompt_ids (row i's prompt is prompt_ids[i, :prompt_lengths[i]]; the pad
  values are ignored); default: every row is P long. Each row runs at its own
  positions (one cache index per row), so it gets the tokens it would get alone.
  temperature 0 is greedy decoding (argmax); otherwise tokens are drawn from
  softmax(logits / temperature), restricted to the top_k most likely tokens
  when top_k > 0: the rule of `sampling`, row i with seed `seed + i` (what
  an Engine of seed `seed` gives its i-th request, so both draw the same tokens).

  Returns int32 [B, P + N]: row i holds its prompt, its N new tokens, then
  zeros; with return_logits=True, (tokens, logits float32 [B, N, V]) where
  logits[i, j] are the logits that chose row i's new token j.

  eos_id: stop at this token. A row's tokens after its first eos_id are all
  eos_id, and once every row has produced it the remaining steps do not run
  the model (their logits are zeros). None (the default): always N tokens.

  loops: a recurrent plan's core loop count (any count >= 1, more than
  trained included, with the model's own parameters); None: the plan's.
  A model with routers (model.mor) routes each token causally, prompt and
  decoded tokens alike (`mor.run_causal`).

  matmul: 'xla' (default), or 'native': the dense weights and the tied
  readout packed once for the CPU kernel of `model.native`
  (`layer_weights.packed_copy`; float32 on CPU).

  Raises ValueError when P + N exceeds model.cfg.max_seq_len (the cache
  length), for loops on a plan without a recurrent core or < 1, for ids outside the vocabulary, an empty prompt, prompt lengths
  outside [1, P], a negative count or a negative temperature / top_k.
  """
  prompt = jnp.asarray(prompt_ids)
  if prompt.ndim != 2:
    raise ValueError(f"prompt_ids must be [batch, length], got shape {prompt.shape}")
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt_ids must be integer token ids, got {prompt.dtype}")
  prompt = prompt.astype(jnp.int32)
  decoder = layer_weights.decode_model(model, matmul)  # ValueError for a bad name or a model it cannot pack
  if loops is not None:
    model.check_loops(int(loops))
  b, p = prompt.shape
  n = int(max_new_tokens)
  if p < 1:
    raise ValueError("prompt_ids is empty: decoding needs at least one prompt token")
  if n < 0:
    raise ValueError(f"max_new_tokens={n} must be >= 0")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
  if top_k < 0:
    raise ValueError(f"top_k={top_k} must be >= 0 (0: no restriction)")
  if prompt_lengths is None:
    lengths = np.full((b,), p, np.int32)
  else:
    lengths = np.asarray(prompt_lengths)
    if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer):
      raise ValueError(f"prompt_lengths must be {b} ints (one per row of prompt_ids), got {lengths.dtype} "
                       f"{lengths.shape}")
    if lengths.min() < 1 or lengths.max() > p:
      raise ValueError(f"prompt_lengths must lie in [1, {p}] (the padded prompt length), got "
                       f"[{lengths.min()}, {lengths.max()}]")
  vocab = model.cfg.vocab_size
  host = np.where(np.arange(p) < lengths[:, None], np.asarray(prompt), 0)  # pad values are not checked
  if host.min() < 0 or host.max() >= vocab:
    raise ValueError(f"prompt_ids must lie in [0, model.vocab_size={vocab}), got [{host.min()}, {host.max()}]")
  max_len = model.cfg.max_seq_len
  if p + n > max_len:
    raise ValueError(f"prompt length {p} + max_new_tokens {n} = {p + n} exceeds model.max_seq_len={max_len} "
                     "(the KV cache length)")
  if prompt_lengths is not None:
    prompt = jnp.where(jnp.arange(p) < jnp.asarray(lengths)[:, None], prompt, 0)
  if eos_id is not None and not 0 <= int(eos_id) < vocab:
    raise ValueError(f"eos_id={eos_id} must lie in [0, model.vocab_size={vocab})")
  if n == 0:
    return (prompt, jnp.zeros((b, 0, model.cfg.vocab_size), jnp.float32)) if return_logits else prompt
  graphdef, state = nnx.split(decoder)
  layout, weights = layer_weights.split_layers(state)
  seeds = jnp.asarray(int(seed) + np.arange(b), jnp.int32)  # row i: the Engine's request i of seed `seed`
  return _generate(graphdef, layout, weights, prompt, jnp.asarray(lengths, jnp.int32), seeds,
                   jnp.asarray(temperature, jnp.float32), max_new_tokens=n, top_k=min(int(top_k), vocab),
                   return_logits=return_logits,
                   eos_id=None if eos_id is None else int(eos_id), loops=None if loops is None else int(loops))
