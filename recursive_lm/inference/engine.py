"""A serving engine: continuous batching over a fixed set of KV-cache slots.

  engine = Engine(model, tokenizer, slots=8)
  outs = engine.generate(["def f(", "import "], max_new_tokens=64, stop=["\\n\\n"])
  outs[0].text, outs[0].finish_reason

or, request by request, `submit(...)` then `step()` until `done()` (each step
returns the requests that finished in it), or `stream()`.

Shapes are static, so the engine compiles a bounded number of programs:

  * the cache holds `slots` rows of `max_len` positions, laid out as the
    model's own (`Transformer.init_cache`; batch is axis 1 of every array);
  * ONE jitted decode program feeds every slot its last token at its own
    position (cache_index [slots], per-row rotary positions) and samples each
    slot's next token with the slot's own temperature / top-k / seed; slots
    without a request run too (their rows are scratch) rather than changing
    the shape. It loops up to `chunk` steps on the device (stopping slots at
    their count or EOS there), so the host is met once per chunk, not once
    per token: on a small model the per-call overhead is most of a step;
  * prefill compiles once per prompt-length bucket (powers of two from 16,
    and max_len) and power-of-two count of rows: a prompt is right-padded to
    its bucket.

Prefill design: the requests admitted in one tick are prefilled together,
one call per prompt bucket, into a fresh cache of R rows (R the next power of
two) and the bucket's length; each row is written into its slot's row of the
engine cache (positions [0, bucket)) in one scatter, padding rows nowhere. The other slots'
rows are never read or written, so no masking of other rows is needed and a
running request's cache cannot be disturbed; prefill runs at full depth
through the model's ordinary forward.
Positions of the slot past the bucket keep the previous request's K/V, and
the right padding writes junk at [length, bucket): neither is ever seen,
because a query at position p only sees keys at positions <= p (causal mask,
also under sliding windows) and the decode step writes position p before
reading it, so every visible position holds this request's own K/V.

Sampling: temperature 0 is greedy (argmax). Otherwise a draw from
softmax(logits / temperature), restricted to the request's top_k most likely
tokens when top_k > 0 (top_k <= the engine's max_top_k, a static bound of the
compiled step). Token j of a request is drawn with fold_in(key(seed), j), so a
request's sample depends on its seed alone, not on which slot it ran in or
what ran beside it.

A request ends at max_new_tokens ("length"), at the tokenizer's EOS ("eos";
the EOS is the last of its tokens and is left out of its text) or when its
text contains one of its stop strings ("stop"; the text is cut before it).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recursive_lm.data.tokenizers import encode_prompt
from recursive_lm.inference import depthwise as depthwise_lib
from recursive_lm.inference import exits, layer_weights, speculate
from recursive_lm.inference.sampling import sample_rows


@dataclasses.dataclass
class Completion:
  """A finished request. tokens: its new token ids (ending with EOS when
  finish_reason == "eos"); text: their decoding without EOS and cut before a
  stop string ("" without a tokenizer); finish_reason: "length" | "eos" | "stop"."""
  id: Any
  prompt_ids: np.ndarray
  tokens: list[int]
  text: str
  finish_reason: str
  # With exits: loops run for each decoded token (the first is prefilled); with routers, recursions it took.
  exit_loops: list[int] | None = None

  @property
  def new_tokens(self) -> int:
    return len(self.tokens)

  @property
  def mean_exit_loop(self) -> float | None:
    """Mean loops run per decoded token (None without exits or decoded tokens)."""
    return float(np.mean(self.exit_loops)) if self.exit_loops else None


@dataclasses.dataclass
class _Request:
  id: Any
  prompt_ids: np.ndarray  # int32 [P]
  max_new_tokens: int
  temperature: float
  top_k: int
  stop: tuple[str, ...]
  seed: int
  tokens: list[int] = dataclasses.field(default_factory=list)
  loops: list[int] = dataclasses.field(default_factory=list)


def default_buckets(max_len: int) -> tuple[int, ...]:
  """Powers of two from 16 below max_len, then max_len."""
  out, b = [], 16
  while b < max_len:
    out.append(b)
    b *= 2
  return tuple(out) + (max_len,)


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "max_top_k", "loops"), donate_argnames=("cache",))
def _prefill(graphdef, layout, state, cache, prompts, lengths, slots, seeds, temperature, top_k, *, max_top_k: int,
             loops: int | None = None):
  """Prompts [R, bucket] (right-padded; lengths [R] real tokens) -> (cache with
  row i written into slot slots[i], positions [0, bucket), and the first new
  tokens int32 [R]). A row whose slot is out of range (the slot count) is
  padding (R is a power of two, so few shapes compile) and writes nothing.
  state: the weights split per layer (`layer_weights`). loops: a recurrent
  core's count (None: the plan's)."""
  model = nnx.merge(graphdef, layer_weights.join_layers(layout, state))
  r, length = prompts.shape
  fresh = model.init_cache(r, length, cache[0]["k"].dtype, **_loops(loops))
  # Only each row's last prompt position is read out.
  logits, fresh, _ = model(prompts, cache=fresh, cache_index=jnp.zeros((r,), jnp.int32), logits_at=lengths - 1,
                           **_loops(loops))
  # Every cache leaf is [L, slots, S, ...]: one scatter of the rows into their slots; padding rows are dropped.
  cache = jax.tree.map(lambda big, small: big.at[:, slots, :length].set(small.astype(big.dtype), mode="drop"),
                       cache, fresh)
  first = sample_rows(logits[:, 0], seeds, jnp.zeros((r,), jnp.int32), temperature, top_k, max_top_k)
  return cache, first


def _loops(loops: int | None) -> dict:
  """The model's keyword for a recurrent core's loop count (none: the plan's)."""
  return {} if loops is None else {"loops": loops}


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "chunk", "max_top_k", "exit_rule", "unrolled",
                                             "loops"), donate_argnames=("cache",))
def _decode(graphdef, layout, state, cache, tokens, positions, seeds, steps, temperature, top_k, remaining, eos_id, *,
            chunk: int, max_top_k: int, exit_rule: exits.ExitRule | None = None, unrolled: bool = True,
            loops: int | None = None):
  """Up to `chunk` decode steps of every slot at once.

  tokens [B]: each slot's last token, at position positions [B]; steps [B]:
  the index of the next token a slot draws; remaining [B]: tokens a slot may
  still draw (0: no request); eos_id: int32 [], -1 for none. A slot stops
  after `remaining` tokens or at EOS; stopped slots still run (static shape)
  at a frozen position of their own row. Stops early once every slot has.
  exit_rule: per-token early exit (`exits.forward_with_exits`) or None (full depth).
  unrolled: run the depth layer by layer (`Transformer.__call__(unrolled=True)`).
  state: the weights split per layer (`layer_weights`: read in place by the unrolled step).
  loops: a recurrent core's count (None: the plan's).
  Returns (cache, drawn int32 [B, chunk], -1 where a slot drew nothing,
  loops int32 [B, chunk]: the loops each drawn token ran, with routers the
  recursions it took; 0 without either).
  """
  model = nnx.merge(graphdef, layer_weights.join_layers(layout, state))
  b = tokens.shape[0]

  def cond(carry):
    return (carry[0] < chunk) & jnp.any(carry[4])

  def body(carry):
    i, cache, tok, pos, alive, out, used = carry
    if exit_rule is None:
      logits, cache, aux = model(tok[:, None], cache=join(cache), cache_index=pos, unrolled=unrolled, **_loops(loops))
      cache = split(cache)
      if "router_depth" in aux:  # routers (model.mor): the recursions each token took
        used = used.at[:, i].set(jnp.where(alive, aux["router_depth"][:, 0], 0))
    else:
      logits, cache, ran = exits.forward_with_exits(model, tok[:, None], cache, pos, exit_rule, **_loops(loops))
      used = used.at[:, i].set(jnp.where(alive, ran, 0))
    nxt = sample_rows(logits[:, -1], seeds, steps + i, temperature, top_k, max_top_k)
    out = out.at[:, i].set(jnp.where(alive, nxt, -1))
    tok, pos = jnp.where(alive, nxt, tok), jnp.where(alive, pos + 1, pos)
    alive = alive & (i + 1 < remaining) & (nxt != eos_id)
    return i + 1, cache, tok, pos, alive, out, used

  # The unrolled step carries the cache as per-layer pieces, updated in place (see layer_weights).
  pieces = unrolled and exit_rule is None
  split, join = (layer_weights.unstack, layer_weights.restack) if pieces else (lambda c: c, lambda c: c)
  carry = (jnp.int32(0), split(cache), tokens, positions, remaining > 0, jnp.full((b, chunk), -1, jnp.int32),
           jnp.zeros((b, chunk), jnp.int32))
  _, cache, _, _, _, out, used = jax.lax.while_loop(cond, body, carry)
  return join(cache), out, used


class Engine:
  """Continuous batching over `slots` rows of a KV cache (see the module docstring).

  model: a `Transformer`; tokenizer: one of `recursive_lm.data.tokenizers`
  (needed for text prompts and stop strings; None to work in ids only).
  max_len: cache positions per slot (default and maximum model.cfg.max_seq_len);
  a request needs prompt length + max_new_tokens <= max_len. Every decode
  step attends over all max_len positions, so keep it near what requests need.
  buckets: prompt lengths prefill compiles for (default `default_buckets`).
  max_top_k: the largest top_k a request may ask for (0: no top-k at all).
  stop_at_eos: end a request at the tokenizer's EOS (if it has one).
  seed: requests without their own seed get seed + their submission number.
  chunk: decode steps per engine tick (one device call, one transfer to the
  host); a slot freed inside a tick is refilled at the next tick.
  exit: per-token early exit of decoded tokens, 'none' (default),
  'confidence:TAU' or 'kl:EPS' (`exits`); prefill always runs at full depth.
  unrolled: decode through the layer-by-layer path rather than the stage's
  scan, which slices (copies) every layer's weights and KV cache out of their
  stacks at every step and stacks the new cache again; the unrolled step reads
  weights and cache in place (`layer_weights`). Measured 1.8x more decode
  tokens/s on CPU before the in-place layout (6-layer cycle plan, 8 slots,
  `benchmark generate`). False keeps the compile time flat in depth for very
  deep plans.
  depthwise: decode by continuous depth-wise batching (`depthwise`: each
  device step runs one loop of the shared stage, every slot at its own loop,
  and an exiting slot draws its next token at once); a tick then runs
  chunk * loops such steps. Needs a plan with one repeated cycle-order stage.
  speculate: K > 0 decodes by few-loop self-speculation (`speculate`): each
  round drafts K tokens with the model cut after `draft_loops` loops of its
  repeated stage and verifies them in one full-depth call; the tokens are
  plain decoding's (any temperature). `chunk` then counts rounds. Not with
  `exit` nor `depthwise`. `speculation` holds the drafted / accepted counts so far.
  loops: a recurrent plan's core loop count for every request (prefill,
  decode and exits), any count >= 1, more than trained included, with the
  model's own parameters (the cache holds one entry per iteration's layer);
  None: the plan's repeats. Not with `depthwise` nor `speculate`.
  Routers (model.mor): each token takes the recursions its routers give it
  (`mor.run_causal`; with `depthwise`, a token the router stops leaves its
  slot at once); `Completion.exit_loops` holds them. Not with `exit` nor
  `speculate`.
  matmul: 'xla' (default), or 'native': every decode path runs a copy of
  the model whose dense weights and tied readout are packed for the CPU
  kernel of `model.native` (`layer_weights.packed_copy`; float32, CPU).
  """

  def __init__(self, model, tokenizer=None, slots: int = 8, max_len: int | None = None,
               buckets: Sequence[int] | None = None, max_top_k: int = 64, stop_at_eos: bool = True, seed: int = 0,
               chunk: int = 8, exit: str | None = None, unrolled: bool = True,  # pylint: disable=redefined-builtin
               depthwise: bool = False, speculate: int = 0, draft_loops: int = 1, loops: int | None = None,
               matmul: str = "xla"):
    cap = model.cfg.max_seq_len
    max_len = cap if max_len is None else int(max_len)
    if int(slots) < 1:
      raise ValueError(f"slots={slots} must be >= 1")
    if not 1 <= max_len <= cap:
      raise ValueError(f"max_len={max_len} must lie in [1, model.max_seq_len={cap}]")
    buckets = default_buckets(max_len) if buckets is None else tuple(sorted(int(b) for b in buckets))
    if not buckets or buckets[0] < 1 or buckets[-1] > max_len:
      raise ValueError(f"buckets={buckets} must be lengths in [1, max_len={max_len}]")
    if int(chunk) < 1:
      raise ValueError(f"chunk={chunk} must be >= 1")
    if int(max_top_k) < 0:
      raise ValueError(f"max_top_k={max_top_k} must be >= 0")
    self.model, self.tokenizer = model, tokenizer
    self.slots, self.max_len, self.buckets, self.max_top_k = int(slots), max_len, buckets, int(max_top_k)
    self.eos_id = tokenizer.eos_id if (tokenizer is not None and stop_at_eos) else None
    self.seed, self.chunk, self.unrolled = int(seed), int(chunk), bool(unrolled)
    self.loops = None if loops is None else int(loops)
    self.exit_rule = exits.parse_exit(exit)
    if self.exit_rule is not None:
      exits.check_model(model, self.loops)  # ValueError for a model without loops
    if depthwise and speculate:
      raise ValueError("speculate and depthwise cannot be combined (the verifier runs every token at full depth)")
    if self.loops is not None and (depthwise or speculate):
      raise ValueError(f"loops={self.loops} runs with the plain decoder only (not with depthwise or speculate)")
    self.routed = model.routed is not None
    if self.routed and (self.exit_rule is not None or speculate):
      raise ValueError(f"model.mor.routing={model.cfg.mor.routing!r}: the routers decide each token's depth; "
                       "exit and speculate are not supported with them")
    self._depths = self.exit_rule is not None or self.routed  # record each token's loops / recursions
    self.depthwise = depthwise_lib.Decoder(model, self.slots, self.exit_rule) if depthwise else None
    self.speculate, self.speculation = self._speculation(speculate, draft_loops, cap), {"drafted": 0, "accepted": 0}
    # The stacked state (depth-wise batching, speculation) and the same weights split per layer (prefill and the
    # plain decode step read them in place: `layer_weights`).
    self._graphdef, self._state = nnx.split(layer_weights.decode_model(model, matmul))
    self._layout, self._weights = layer_weights.split_layers(self._state)
    # Drafts may run k positions past max_len; a recurrent plan at `loops` needs one entry per iteration's layer.
    self._cache = model.init_cache(self.slots, max_len + self.speculate, **_loops(self.loops))  # ValueError: bad loops
    self._waiting: collections.deque[_Request] = collections.deque()
    self._running: list[_Request | None] = [None] * self.slots
    self._submitted = 0

  # ---------------------------------------------------------------- requests

  def submit(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             stop: Iterable[str] = (), seed: int | None = None, id: Any = None) -> Any:  # pylint: disable=redefined-builtin
    """Queue a request; returns its id (default: its submission number).

    prompt: text (encoded with the tokenizer, after BOS when it expects one)
    or token ids int [P]. Raises ValueError for an empty prompt, ids outside
    the vocabulary, prompt + max_new_tokens beyond max_len, a negative count,
    temperature or top_k, top_k > max_top_k, or stop strings without a tokenizer.
    """
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer (Engine(model, tokenizer, ...)); or pass token ids")
      ids = np.asarray(encode_prompt(self.tokenizer, prompt), np.int32)
    else:
      ids = np.asarray(prompt)
      if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"prompt ids must be one sequence of ints [P], got {ids.dtype} {ids.shape}")
      ids = ids.astype(np.int32)
    n, vocab = int(max_new_tokens), self.model.cfg.vocab_size
    stop = tuple(stop)
    if ids.size == 0:
      raise ValueError("prompt is empty (encodes to no tokens)")
    if ids.min() < 0 or ids.max() >= vocab:
      raise ValueError(f"prompt ids must lie in [0, vocab_size={vocab}), got [{ids.min()}, {ids.max()}]")
    if n < 0:
      raise ValueError(f"max_new_tokens={n} must be >= 0")
    if ids.size + n > self.max_len:
      raise ValueError(f"prompt too long: {ids.size} tokens + max_new_tokens {n} = {ids.size + n} exceeds "
                       f"max_len={self.max_len} (the engine's cache length; model.max_seq_len="
                       f"{self.model.cfg.max_seq_len})")
    if temperature < 0:
      raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if not 0 <= int(top_k) <= self.max_top_k:
      raise ValueError(f"top_k={top_k} must lie in [0, max_top_k={self.max_top_k}] (0: no restriction)")
    if stop and (self.tokenizer is None or not all(isinstance(s, str) and s for s in stop)):
      raise ValueError(f"stop={list(stop)} must be non-empty strings, and needs a tokenizer")
    number = self._submitted
    self._submitted += 1
    rid = number if id is None else id
    seed = self.seed + number if seed is None else int(seed)
    self._waiting.append(_Request(rid, ids, n, float(temperature), int(top_k), stop, seed))
    return rid

  def done(self) -> bool:
    """No request waiting or running."""
    return not self._waiting and all(r is None for r in self._running)

  def generate(self, prompts: Sequence, **kwargs) -> list[Completion]:
    """Run `prompts` (each with the same submit keyword arguments) to the end;
    completions in the order of `prompts`."""
    if not self.done():
      raise RuntimeError("generate() needs an idle engine; step() the pending requests first")
    ids = [self.submit(p, **kwargs) for p in prompts]
    out = {c.id: c for c in self.stream()}
    return [out[i] for i in ids]

  def stream(self) -> Iterator[Completion]:
    """Step until done, yielding each completion as it finishes."""
    while not self.done():
      yield from self.step()

  # ---------------------------------------------------------------- engine tick

  def step(self) -> list[Completion]:
    """Admit waiting requests into free slots (prefilled together), then up to
    `chunk` decode steps for every running slot in one device call. Returns
    the requests finished in this tick."""
    finished = []
    # Rounds of admission: every free slot takes a waiting request, and the new
    # requests are prefilled together, one call per prompt bucket. A request that
    # ends with its first token frees its slot for the next round.
    while self._waiting and None in self._running:
      admitted = []
      for slot in (s for s in range(self.slots) if self._running[s] is None):
        while self._waiting:
          req = self._waiting.popleft()
          if req.max_new_tokens == 0:
            finished.append(self._complete(req, "length"))
            continue
          admitted.append((slot, req))
          break
      for (slot, req), first in zip(admitted, self._admit(admitted)):
        reason = self._append(req, first)
        if reason:
          finished.append(self._complete(req, reason))
        else:
          self._running[slot] = req
    live = [s for s, r in enumerate(self._running) if r is not None]
    if not live:
      return finished
    tokens, positions, seeds, steps, temps, topks, remaining = (np.zeros(self.slots, np.int32) for _ in range(7))
    temps = temps.astype(np.float32)
    for s in live:
      r = self._running[s]
      tokens[s], positions[s] = r.tokens[-1], r.prompt_ids.size + len(r.tokens) - 1
      seeds[s], steps[s], temps[s], topks[s] = r.seed, len(r.tokens), r.temperature, r.top_k
      remaining[s] = r.max_new_tokens - len(r.tokens)
    eos = np.int32(-1 if self.eos_id is None else self.eos_id)
    if self.speculate:
      self._cache, drawn, drafted, accepted = speculate.decode(
          self._graphdef, self._state, self._cache, tokens, positions, seeds, steps, temps, topks, remaining, eos,
          k=self.speculate, depth=self._draft_depth, chunk=self.chunk, max_top_k=self.max_top_k,
          unrolled=self.unrolled)
      self.speculation["drafted"] += int(np.sum(drafted))
      self.speculation["accepted"] += int(np.sum(accepted))
      return finished + self._collect(live, np.asarray(drawn), None)
    if self.depthwise is not None:
      self._cache, drawn, used = self.depthwise(self._graphdef, self._state, self._cache, tokens, positions, seeds,
                                                steps, temps, topks, remaining, eos, chunk=self.chunk,
                                                max_top_k=self.max_top_k)
    else:
      self._cache, drawn, used = _decode(self._graphdef, self._layout, self._weights, self._cache, tokens, positions,
                                         seeds, steps, temps, topks, remaining, eos, chunk=self.chunk,
                                         max_top_k=self.max_top_k, exit_rule=self.exit_rule, unrolled=self.unrolled,
                                         loops=self.loops)
    return finished + self._collect(live, np.asarray(drawn), np.asarray(used))

  def _collect(self, live: list[int], drawn: np.ndarray, used: np.ndarray | None) -> list[Completion]:
    """Record the tokens the live slots drew in a tick (-1: none; used: their loops
    with exits); returns the requests that finished, freeing their slots."""
    finished = []
    for s in live:
      r = self._running[s]
      for i, token in enumerate(drawn[s]):
        if token >= 0 and self._depths:
          r.loops.append(int(used[s, i]))
        # The device stops a slot at its count or EOS; a stop string is found here, and what the
        # slot drew after it in this chunk is dropped.
        reason = self._append(r, int(token)) if token >= 0 else None
        if reason:
          finished.append(self._complete(r, reason))
          self._running[s] = None
          break
    return finished

  def _speculation(self, k: int, draft_loops: int, cap: int) -> int:
    """Validated speculation length (0: off); sets the draft depth."""
    k = int(k)
    if k < 0 or k > cap:
      raise ValueError(f"speculate={k} must lie in [0, model.max_seq_len={cap}] (0: off)")
    if k and self.exit_rule is not None:
      raise ValueError("speculate and exit cannot be combined (the verifier runs every token at full depth)")
    self._draft_depth = speculate.draft_depth(self.model, draft_loops) if k else 0
    return k

  def bucket(self, length: int) -> int:
    """The prefill length a prompt of `length` tokens is padded to."""
    return next(b for b in self.buckets if b >= length) if length <= self.buckets[-1] else self.max_len

  def _admit(self, admitted: list[tuple[int, _Request]]) -> list[int]:
    """Prefill the (slot, request) pairs, one call per prompt bucket; their first tokens, in order."""
    first = [0] * len(admitted)
    by_bucket: dict[int, list[int]] = {}
    for i, (_, req) in enumerate(admitted):
      by_bucket.setdefault(self.bucket(req.prompt_ids.size), []).append(i)
    for bucket, group in by_bucket.items():
      rows = 1 << (len(group) - 1).bit_length()  # a power of two: few compiled shapes
      prompts = np.zeros((rows, bucket), np.int32)
      lengths, slots = np.ones(rows, np.int32), np.full(rows, self.slots, np.int32)  # padding: 1 token, no slot
      seeds, top_k, temperature = np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.float32)
      for row, i in enumerate(group):
        slot, req = admitted[i]
        p = req.prompt_ids.size
        prompts[row, :p], lengths[row], slots[row] = req.prompt_ids, p, slot
        seeds[row], temperature[row], top_k[row] = req.seed, req.temperature, req.top_k
      self._cache, drawn = _prefill(self._graphdef, self._layout, self._weights, self._cache, prompts, lengths, slots,
                                    seeds, temperature, top_k, max_top_k=self.max_top_k, loops=self.loops)
      drawn = np.asarray(drawn)
      for row, i in enumerate(group):
        first[i] = int(drawn[row])
        if self.depthwise is not None:
          self.depthwise.admitted(admitted[i][0])
    return first

  def _append(self, req: _Request, token: int) -> str | None:
    """Record a new token; the finish reason if the request ends with it."""
    req.tokens.append(token)
    if self.eos_id is not None and token == self.eos_id:
      return "eos"
    if req.stop and self._stop_at(req) is not None:
      return "stop"
    return "length" if len(req.tokens) >= req.max_new_tokens else None

  def _text(self, req: _Request) -> str:
    if self.tokenizer is None:
      return ""
    ids = req.tokens[:-1] if (self.eos_id is not None and req.tokens and req.tokens[-1] == self.eos_id) else req.tokens
    return self.tokenizer.decode(np.asarray(ids, np.int32))

  def _stop_at(self, req: _Request) -> int | None:
    text = self._text(req)
    hits = [i for i in (text.find(s) for s in req.stop) if i >= 0]
    return min(hits) if hits else None

  def _complete(self, req: _Request, reason: str) -> Completion:
    text = self._text(req)
    if reason == "stop":
      text = text[:self._stop_at(req)]
    return Completion(req.id, req.prompt_ids, list(req.tokens), text, reason,
                      list(req.loops) if self._depths else None)
