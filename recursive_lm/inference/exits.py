"""Per-token early exit at the loop boundaries of a repeated stage.

A rule is decided per row after each full loop of a cycle-order stage that
repeats (1-2-3 | 1-2-3 | ...): the model's own readout (final norm + head)
is applied to the row's current state and

  confidence:TAU  exits when the readout's max probability >= TAU (0 < TAU <= 1);
  kl:EPS          exits when KL(p_loop || p_previous_loop) < EPS (EPS > 0;
                  Huginn's rule; never after the first loop, which has no
                  predecessor).

A row that exits keeps its state from then on: its next token is read out
from that exit state, and the keys/values of the layers it skips are
computed from that exit state (as CALM propagates the exit state to the
skipped layers), so later tokens find K/V at every layer. While some rows of
the batch still run, the later layers run on every row (one shape) with the
exited rows' residual streams frozen: the K/V they write for those rows are
the same. Once every row has exited, the rest of the depth runs only the K/V
projections (`Block.write_kv`): compute is saved when all rows exit at once
(always at batch 1); depth-wise batching is what would save it per row.

`forward_with_exits` walks the plan layer by layer through the model's one
per-layer entry point (`recursion.apply_layer`), like the unrolled reference.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from recursive_lm.model.recurrent import initial_state
from recursive_lm.model.recursion import apply_layer, layer_modules


class ExitRule(NamedTuple):
  kind: str  # "confidence" | "kl"
  threshold: float


def parse_exit(spec: str | None) -> ExitRule | None:
  """'none' / None -> None; 'confidence:TAU' (0 < TAU <= 1) or 'kl:EPS' (EPS > 0) -> ExitRule;
  a rule object (an ExitRule, or one with `decide`, see there) as it is.
  Raises ValueError naming the spec otherwise."""
  if spec is None or spec == "none":
    return None
  if hasattr(spec, "decide") or isinstance(spec, ExitRule):  # a rule object (see `decide`)
    return spec
  kind, _, value = str(spec).partition(":")
  try:
    threshold = float(value)
  except ValueError:
    threshold = None
  if kind == "confidence" and threshold is not None and 0 < threshold <= 1:
    return ExitRule(kind, threshold)
  if kind == "kl" and threshold is not None and threshold > 0:
    return ExitRule(kind, threshold)
  raise ValueError(f"exit={spec!r} must be 'none', 'confidence:TAU' with 0 < TAU <= 1 or 'kl:EPS' with EPS > 0")


def decide(rule, logp, prev, loop, positions):
  """Per row: whether its token exits after `loop` loops (int, or int [B]).

  logp [B, V]: log-probabilities of the readout after this loop; prev [B, V]:
  those after the previous loop (meaningless where loop == 1); positions [B]:
  the tokens' positions. An ExitRule decides by its kind; any other hashable
  object with a method `decide(logp, prev, loop, positions) -> bool [B]` by
  that (deterministic rules for tests and experiments).
  """
  if not isinstance(rule, ExitRule):
    return rule.decide(logp, prev, loop, positions)
  if rule.kind == "confidence":
    return jnp.exp(logp.max(-1)) >= rule.threshold
  kl = jnp.sum(jnp.exp(logp) * (logp - prev), -1)
  return (jnp.asarray(loop) > 1) & (kl < rule.threshold)  # the first loop has no predecessor


def loop_boundaries(plan) -> tuple[int, ...]:
  """Effective-layer depths after which a loop of a repeated cycle-order stage
  ends and another follows (where an exit may be taken). Raises ValueError for
  a plan without one."""
  out = []
  for i, spec in enumerate(plan.stages):
    if spec.repeats > 1 and spec.order == "cycle":
      layers = plan.stage_layers(i)
      out += [l.depth for l in layers if l.block == spec.unique_blocks - 1 and l.repeat < spec.repeats - 1]
  if not out:
    raise ValueError("early exit needs a model with a repeated stage in cycle order (loops to exit between); "
                     "this plan has none")
  return tuple(out)


def check_model(model, loops: int | None = None) -> None:
  """ValueError unless `model` run with `loops` (a recurrent core's count;
  None: the plan's) has loop boundaries to exit at."""
  if model.recurrent:
    n = model.plan.stages[1].repeats if loops is None else int(loops)
    if n < 2:
      raise ValueError(f"early exit needs the recurrent core looped at least twice (loops={n})")
  else:
    loop_boundaries(model.plan)


def _take(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


def _put(tree, i, value):
  return jax.tree.map(lambda a, v: a.at[i].set(v), tree, value)


def _entry(plan, cache, layer):
  """The cache entry {'k','v'} [B, S, K, Hd] that `layer` reads and writes."""
  return _take(cache[0], layer.kv_slot) if plan.kv_sharing != "none" else _take(cache[layer.stage], layer.slot)


def _store(plan, cache, layer, entry):
  if plan.kv_sharing != "none":
    return [_put(cache[0], layer.kv_slot, entry)] if layer.kv_write else cache
  cache = list(cache)
  cache[layer.stage] = _put(cache[layer.stage], layer.slot, entry)
  return cache


def _write_kv(stage, layer, x, ctx, entry):
  """Only the K/V that `layer` writes for x (`Block.write_kv`), with the
  layer's own block, depth slot, rotary kind and window, as `apply_layer` picks them."""
  if stage.shared_kv and not layer.kv_write:
    return entry
  block, slot, kv_proj, kv_lora = layer_modules(stage, layer)
  return block.write_kv(x, slot, ctx.for_layer(rope=layer.rope, window=layer.window), entry, kv_proj, kv_lora)


def forward_with_exits(model, tokens, cache, cache_index, rule: ExitRule, loops: int | None = None):
  """tokens [B, T] -> (logits [B, T, V] float32, cache, loops int32 [B]).

  A recurrent plan goes to `recurrent_with_exits` (its core run `loops`
  times, default the plan's repeats); other plans take no loop count.

  Like `model(tokens, cache=cache, cache_index=cache_index)` but each row may
  exit at a loop boundary by `rule` (decided on its last position); loops[i]:
  the loops row i ran (1 .. boundaries + 1, the last meaning no exit). After
  the first loop, each layer's K/V are written by its K/V projections alone
  (`Block.write_kv`) and the rest of the layer runs only while some row has
  not exited, so once every row has, the rest of the depth costs just the
  K/V projections. The full layer writes the same K/V again (unchanged).
  """
  if model.recurrent:
    return recurrent_with_exits(model, tokens, cache, cache_index, rule, loops)
  plan, cfg = model.plan, model.cfg
  bounds = loop_boundaries(plan)
  ctx, _ = model.context(tokens.shape[1], cache_index)
  x = model.embed(tokens, jnp.dtype(cfg.compute_dtype))
  b = tokens.shape[0]
  exited = jnp.zeros((b,), bool)
  loops = jnp.full((b,), len(bounds) + 1, jnp.int32)
  layers = plan.layers()
  # Segments of the depth between exit points: loop 1, loop 2, ..., the last loop and what follows it.
  cuts = [0] + [d + 1 for d in bounds] + [len(layers)]
  segments = [layers[lo:hi] for lo, hi in zip(cuts[:-1], cuts[1:])]
  can_skip = all(hasattr(model.stages[l.stage].blocks, "write_kv") for l in layers)

  def full(segment, x, cache, exited):
    for layer in segment:
      new, entry, _ = apply_layer(model.stages[layer.stage], layer, x, ctx, _entry(plan, cache, layer))
      cache = _store(plan, cache, layer, entry)
      x = jnp.where(exited[:, None, None], x, new)  # an exited row keeps its exit state
    return x, cache

  def gated(segment, x, cache, exited):
    """The segment with its K/V written for every row first, outside the
    branch (so the cache is never a branch output, which would copy it), then
    the full layers only while some row still runs: their K/V are the same."""
    for layer in segment:
      stage = model.stages[layer.stage]
      entry = _write_kv(stage, layer, x, ctx, _entry(plan, cache, layer))
      cache = _store(plan, cache, layer, entry)

      def run(op, stage=stage, layer=layer):
        x, exited, entry = op
        new, _, _ = apply_layer(stage, layer, x, ctx, entry)
        return jnp.where(exited[:, None, None], x, new)

      x = jax.lax.cond(jnp.all(exited), lambda op: op[0], run, (x, exited, entry))
    return x, cache

  prev = None
  for j, segment in enumerate(segments):
    if j == 0 or not can_skip:
      x, cache = full(segment, x, cache, exited)
    else:
      x, cache = gated(segment, x, cache, exited)
    if j == len(segments) - 1:
      break
    logp = jax.nn.log_softmax(model.readout(x[:, -1]), axis=-1)  # [B, V]
    go = decide(rule, logp, logp if prev is None else prev, j + 1, cache_index)
    prev = logp
    go = go & ~exited
    loops = jnp.where(go, j + 1, loops)
    exited = exited | go
  return model.readout(x), cache, loops


def teacher_forced(model, tokens, rule):
  """tokens [B, T] -> (logits [B, T, V] float32, loops int32 [B, T]).

  The cache-free forward of a whole sequence with every position exiting on
  its own by `rule`, as decoding with exits treats a token: an exited
  position keeps its exit state through the rest of the depth (its logits
  are the readout of that state, and the later layers' K/V at that position
  are projected from it, which is what later positions attend to). For the
  loss with exits of teacher-forced text. Plans without KV sharing.
  """
  plan, cfg = model.plan, model.cfg
  if plan.kv_sharing != "none":
    raise ValueError(f"teacher-forced exits need model.kv_sharing='none', not {plan.kv_sharing!r}")
  if model.recurrent:  # the walk below has no input injection (nor has forward_with_exits)
    raise ValueError("teacher-forced exits do not support the recurrent preset (input injection)")
  bounds = loop_boundaries(plan)
  b, t = tokens.shape
  ctx, _ = model.context(t)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x = model.embed(tokens, jnp.dtype(cfg.compute_dtype))
  exited = jnp.zeros((b, t), bool)
  loops = jnp.full((b, t), len(bounds) + 1, jnp.int32)
  prev, j = None, 0
  for layer in plan.layers():
    new, _, _ = apply_layer(model.stages[layer.stage], layer, x, ctx, None)
    x = jnp.where(exited[..., None], x, new)
    if layer.depth in bounds:
      j += 1
      logp = jax.nn.log_softmax(model.readout(x), axis=-1)  # [B, T, V]
      go = decide(rule, logp, logp if prev is None else prev, j, positions) & ~exited
      prev = logp
      loops = jnp.where(go, j, loops)
      exited = exited | go
  return model.readout(x), loops


def recurrent_with_exits(model, tokens, cache, cache_index, rule: ExitRule, loops: int | None = None):
  """`forward_with_exits` for the recurrent plan (prelude, core x loops, coda;
  loops: a Python int, default the plan's repeats, with the cache of
  `model.init_cache(loops=loops)`).

  After every core iteration but the last, a row that has not exited reads
  out what the model would predict if it stopped there: the coda run on its
  state (its K/V writes discarded) and the readout, as Huginn decides. A row
  that exits keeps its core state from then on: the later iterations' K/V
  are computed from that state (as the plain rule propagates the exit state),
  and once every row has exited they cost only the K/V projections. The coda
  then runs once on every row's final core state, writing its K/V; an exited
  row's logits are those of its exit. loops[i]: core iterations row i ran.
  """
  plan, cfg = model.plan, model.cfg
  check_model(model, loops)
  n = plan.stages[1].repeats if loops is None else int(loops)
  ctx, _ = model.context(tokens.shape[1], cache_index)
  b = tokens.shape[0]
  cache = list(cache)
  prelude, core, coda = model.stages
  u = plan.stages[1].unique_blocks
  core_layers = plan.loop_layers(1, n)

  def walk(stage, layers, x, c):
    for i, layer in enumerate(layers):
      x, entry, _ = apply_layer(stage, layer, x, ctx, _take(c, i))
      c = _put(c, i, entry)
    return x, c

  x, cache[0] = walk(prelude, plan.stage_layers(0), model.embed(tokens, jnp.dtype(cfg.compute_dtype)), cache[0])
  e = x
  s = initial_state(cfg.recurrent.init_state, e, None, ctx.positions)
  exited = jnp.zeros((b,), bool)
  used = jnp.full((b,), n, jnp.int32)
  prev = None
  can_skip = hasattr(core.blocks, "write_kv")

  def probe(s):
    return jax.nn.log_softmax(model.readout(walk(coda, plan.stage_layers(2), s, cache[2])[0][:, -1]), axis=-1)

  for j in range(n):
    # An exited row's frozen state is every later layer's input (no injection, no update).
    x = jnp.where(exited[:, None, None], s, model.injection(s, e))
    for i in range(j * u, (j + 1) * u):
      layer = core_layers[i]
      if j == 0 or not can_skip:
        new, entry, _ = apply_layer(core, layer, x, ctx, _take(cache[1], i))
      else:  # K/V for every row outside the branch; the full layer only while some row runs
        entry = _write_kv(core, layer, x, ctx, _take(cache[1], i))
        new = jax.lax.cond(jnp.all(exited), lambda op: op[0],
                           lambda op, layer=layer: apply_layer(core, layer, op[0], ctx, op[1])[0], (x, entry))
      cache[1] = _put(cache[1], i, entry)
      x = jnp.where(exited[:, None, None], x, new)
    s = x
    if j == n - 1:
      break
    logp = probe(s) if prev is None else jax.lax.cond(jnp.all(exited), lambda s: prev, probe, s)
    go = decide(rule, logp, logp if prev is None else prev, j + 1, cache_index)
    prev = logp
    go = go & ~exited
    used = jnp.where(go, j + 1, used)
    exited = exited | go
  x, cache[2] = walk(coda, plan.stage_layers(2), s, cache[2])
  return model.readout(x), cache, used
