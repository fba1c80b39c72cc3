"""Per-token early exit at the loop boundaries of a repeated stage.

A rule is decided per row after each full loop of a cycle-order stage that
repeats (1-2-3 | 1-2-3 | ...): the model's own readout (final norm + head)
is applied to the row's current state and

  confidence:TAU  exits when the readout's max probability >= TAU (0 < TAU <= 1);
  kl:EPS          exits when KL(p_loop || p_previous_loop) < EPS (EPS > 0;
                  Huginn's rule; never after the first loop, which has no
                  predecessor).

A row that exits keeps its state from then on: its next token is read out
from that exit state. The later layers still run on every row (the batch
keeps one shape), but an exited row's residual stream is not updated, so
the keys/values those layers write for it are computed from its exit state
(as CALM propagates the exit state to the skipped layers): later tokens find
K/V at every layer. So this saves no compute yet inside a batched step; it is
the decision rule and the K/V treatment that depth-wise batching builds on.

`forward_with_exits` walks the plan layer by layer through the model's one
per-layer entry point (`recursion.apply_layer`), like the unrolled reference.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from recursive_lm.model.recursion import apply_layer


class ExitRule(NamedTuple):
  kind: str  # "confidence" | "kl"
  threshold: float


def parse_exit(spec: str | None) -> ExitRule | None:
  """'none' / None -> None; 'confidence:TAU' (0 < TAU <= 1) or 'kl:EPS' (EPS > 0) -> ExitRule.
  Raises ValueError naming the spec otherwise."""
  if spec is None or spec == "none":
    return None
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


def _take(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


def _put(tree, i, value):
  return jax.tree.map(lambda a, v: a.at[i].set(v), tree, value)


def forward_with_exits(model, tokens, cache, cache_index, rule: ExitRule):
  """tokens [B, T] -> (logits [B, T, V] float32, cache, loops int32 [B]).

  Like `model(tokens, cache=cache, cache_index=cache_index)` but each row may
  exit at a loop boundary by `rule` (decided on its last position); loops[i]:
  the loops row i ran (1 .. boundaries + 1, the last meaning no exit).
  """
  plan, cfg = model.plan, model.cfg
  bounds = loop_boundaries(plan)
  ctx, _ = model.context(tokens.shape[1], cache_index)
  x = model.embed(tokens, jnp.dtype(cfg.compute_dtype))
  b = tokens.shape[0]
  exited = jnp.zeros((b,), bool)
  loops = jnp.full((b,), len(bounds) + 1, jnp.int32)
  shared = plan.kv_sharing != "none"
  prev = None
  for layer in plan.layers():
    stage = model.stages[layer.stage]
    if shared:
      entry = _take(cache[0], layer.kv_slot)
    else:
      entry = _take(cache[layer.stage], layer.slot)
    new, entry, _ = apply_layer(stage, layer, x, ctx, entry)
    if shared:
      if layer.kv_write:
        cache = [_put(cache[0], layer.kv_slot, entry)]
    else:
      cache = list(cache)
      cache[layer.stage] = _put(cache[layer.stage], layer.slot, entry)
    x = jnp.where(exited[:, None, None], x, new)
    if layer.depth in bounds:
      logp = jax.nn.log_softmax(model.readout(x[:, -1]), axis=-1)  # [B, V]
      if rule.kind == "confidence":
        go = jnp.exp(logp.max(-1)) >= rule.threshold
      else:
        go = jnp.zeros((b,), bool) if prev is None else jnp.sum(jnp.exp(logp) * (logp - prev), -1) < rule.threshold
      prev = logp
      go = go & ~exited
      loops = jnp.where(go, bounds.index(layer.depth) + 1, loops)
      exited = exited | go
  return model.readout(x), cache, loops
