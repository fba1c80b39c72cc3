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

from recursive_lm import plan as plan_lib
from recursive_lm.model import recurrent
from recursive_lm.model import walk as walk_lib


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


def loop_boundaries(plan, use: str = "early exit") -> tuple[int, ...]:
  """Effective-layer depths after which a loop ends and another follows (where
  an exit may be taken: `plan.Loop.boundaries`). Raises PlanError (a
  ValueError) naming `use` for a plan without a loop in cycle order, or one
  that runs its loop once."""
  loop = plan.loop(use)
  if not loop.boundaries:
    raise plan_lib.PlanError(f"{use} needs a loop run at least twice; the plan's loop "
                             f"{plan.stages[loop.stage].name!r} runs {loop.repeats} time(s)")
  return loop.boundaries


def check_model(model, loops: int | None = None, use: str = "early exit") -> None:
  """ValueError unless `model` run with `loops` (a recurrent core's count;
  None: the plan's) has loop boundaries to exit at."""
  loop = model.plan.loop(use)
  if loop.inject:
    n = loop.repeats if loops is None else int(loops)
    if n < 2:
      raise ValueError(f"{use} needs the recurrent core looped at least twice (loops={n})")
  else:
    loop_boundaries(model.plan, use)


def _decision(rule, cache_index, readout):
  """The loop-end hook of an exit walk, and what it records.

  After loop j (0-based) of n, rows not yet frozen read out `readout(x)`
  (log-probabilities [B, V] or [B, T, V]) and those the rule sends off are
  frozen, their loop count j + 1 recorded (n: never exited). The last loop
  decides nothing. Returns (hook, record): set record["loops"] to n before
  the walk; it holds the loops after it."""
  record = {"prev": None}

  def hook(x, j, frozen, n):
    if j == n - 1:
      return frozen
    logp = readout(x, frozen, record["prev"])
    prev = record["prev"]
    go = decide(rule, logp, logp if prev is None else prev, j + 1, cache_index) & ~frozen
    record["prev"] = logp
    record["loops"] = jnp.where(go, j + 1, record["loops"])
    return frozen | go

  return hook, record


def forward_with_exits(model, tokens, cache, cache_index, rule: ExitRule, loops: int | None = None):
  """tokens [B, T] -> (logits [B, T, V] float32, cache, loops int32 [B]).

  Like `model(tokens, cache=cache, cache_index=cache_index)` but each row may
  exit at a loop boundary by `rule` (decided on its last position); loops[i]:
  the loops row i ran (1 .. boundaries + 1, the last meaning no exit). After
  the first loop, each layer's K/V are written by its K/V projections alone
  (`kv.fill`) and the rest of the layer runs only while some row has
  not exited, so once every row has, the rest of the depth costs just the
  K/V projections. The full layer writes the same K/V again (unchanged).

  A recurrent plan (loops: its core's count, a Python int, default the
  plan's repeats, with the cache of `model.init_cache(loops=loops)`) decides
  as Huginn does: after every core iteration but the last, a row that has not
  exited reads out what the model would predict if it stopped there (the coda
  run on its state, its K/V writes discarded). A row that exits keeps its core
  state through the later iterations (their K/V are computed from it); the
  coda then runs on every row's final core state, writing its K/V. Other
  plans take no loop count. Both are one walk (`model.walk`) with an
  exit hook.
  """
  plan, cfg = model.plan, model.cfg
  check_model(model, loops)
  loop = model.loop
  if loops is not None and not loop.inject:
    raise ValueError(f"loops={loops}: only a recurrent plan takes a loop count")
  n = loop.repeats if loops is None else int(loops)
  ctx, _ = model.context(tokens.shape[1], cache_index)
  b = tokens.shape[0]
  x = model.embed(tokens, jnp.dtype(cfg.compute_dtype))
  can_skip = all(hasattr(model.stages[l.stage].blocks, "write_kv") for l in plan.layers())
  if not loop.inject:
    def readout(x, frozen, prev):
      return jax.nn.log_softmax(model.readout(x[:, -1]), axis=-1)  # [B, V]
    hook, record = _decision(rule, cache_index, readout)
    record["loops"] = jnp.full((b,), n, jnp.int32)
    x, cache, _, _ = walk_lib.walk(model, plan.layers(), x, ctx, cache, frozen=jnp.zeros((b,), bool),
                                   gate=can_skip, hooks=walk_lib.Hooks(model.loop_start,
                                                                       lambda x, j, f: hook(x, j, f, n)))
    return model.readout(x), cache, record["loops"]

  coda = [l for l in plan.layers() if l.stage > loop.stage]
  layers = [l for l in plan.layers() if l.stage < loop.stage] + plan.loop_layers(loop.stage, n) + coda
  inject = recurrent.loop_start(model, ctx)

  def readout(s, frozen, prev):  # the coda on the state, its K/V discarded; nothing new once every row exited
    probe = lambda s: jax.nn.log_softmax(model.readout(walk_lib.walk(model, coda, s, ctx, cache)[0][:, -1]), -1)
    return probe(s) if prev is None else jax.lax.cond(jnp.all(frozen), lambda s: prev, probe, s)

  hook, record = _decision(rule, cache_index, readout)
  record["loops"] = jnp.full((b,), n, jnp.int32)

  def loop_end(x, j, frozen):  # after the last iteration the coda runs on every row: nothing stays frozen
    frozen = hook(x, j, frozen, n)
    return None if j == n - 1 else frozen

  state = {"frozen": jnp.zeros((b,), bool)}
  hooks = walk_lib.Hooks(loop_start=lambda x, j: inject(x, j, state), loop_end=lambda x, j, f: _track(
      state, loop_end(x, j, f)))
  x, cache, _, _ = walk_lib.walk(model, layers, x, ctx, cache, frozen=state["frozen"], gate=can_skip, hooks=hooks)
  return model.readout(x), cache, record["loops"]


def _track(state: dict, frozen):
  """Keep the walk's frozen rows where the injection hook can see them."""
  state["frozen"] = frozen
  return frozen


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
  if model.recurrent:
    raise ValueError("teacher-forced exits do not support the recurrent preset (input injection)")
  n = len(loop_boundaries(plan)) + 1
  b, t = tokens.shape
  ctx, _ = model.context(t)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x = model.embed(tokens, jnp.dtype(cfg.compute_dtype))
  hook, record = _decision(rule, positions, lambda x, frozen, prev: jax.nn.log_softmax(model.readout(x), axis=-1))  # [B, T, V]
  record["loops"] = jnp.full((b, t), n, jnp.int32)
  x, _, _, _ = walk_lib.walk(model, plan.layers(), x, ctx, None, frozen=jnp.zeros((b, t), bool),
                             hooks=walk_lib.Hooks(model.loop_start, lambda x, j, f: hook(x, j, f, n)))
  return model.readout(x), record["loops"]
