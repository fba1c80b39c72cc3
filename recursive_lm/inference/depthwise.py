"""Continuous depth-wise batching: one loop of the shared stage per engine tick,
every slot at its own loop index.

Because every loop of a repeated stage runs the same block weights, tokens at
different loop depths can share one call of the shared blocks (Relaxed
Recursive Transformers' "continuous depth-wise batching"). A tick applies ONE
loop (the stage's U unique blocks in order) to every slot; row b sits at its
own loop r[b] and uses that loop's per-depth things:

  * its LoRA adapters and per-depth norms: the stage's per-depth slot
    r[b] * U + u gathered per row (`row_slot`: LoRA A [B, d_in, R] and
    B [R, d_out] -> [B, R, d_out], so the adapter's `x @ A @ B` is a batched
    matmul, one adapter per row; norm scales [B, 1, (1,) dim]);
  * its KV-cache entry (the stage's cache entry r[b] * U + u, row b), gathered
    for the attention and written back at the row's position only;
  * its rotary kind and sliding window (per-row rotary tables, window [B]).

After the loop each row's token may exit (the engine's exit rule, decided
like `exits.forward_with_exits` on the readout of the row's state) or has
run the last loop. An exiting row is read out, samples its next token and
re-enters at loop 0 on the next tick, so no slot waits for the deepest row.
The stages before the shared one (prelude, `first`) run when a token enters
(tick of loop 0), those after it (coda, `last`) when it leaves; each tick
runs them on every row (one static shape) and keeps their result only for the
rows entering or leaving. A plan whose every layer is in the shared stage
(the `cycle` / `looped` presets) pays nothing for that.

Keys/values of the layers a token skips (choice of `exits`: filled from its
exit state, as CALM does) are written by the skipped layers' K/V projections
alone, in the tick the token exits: for every later loop j and block u, the
rows exiting before loop j get slot j * U + u at their position. The later
stages see an exited token's state frozen at its exit state (`exits`:
their K/V come from it; its logits are the readout of the exit state), and a
token that ran every loop goes through them in full. So a request gets the
tokens (and exit loops) it gets from `exits.forward_with_exits`, alone or
batched (tested), and with exits off the tokens of plain decoding.

Routers (model.mor, `mor.run_causal`) are the exit rule: the loop is the
routed stage and loop r is recursion step r. A row runs step r only when its
token was chosen for it (an entering token's step-0 choice is made at entry;
a token of depth 0 runs nothing and leaves); after the step the router of
step r + 1 decides on the new state, and a token it stops is read out at
once (the stages after the loop run on its state, as in the plain forward)
and its slot takes the next token at loop 0. Each step writes 'valid' (the
token is a key of that step) at the row's position, and a leaving token
clears it for the steps it skips, so the cache holds what the plain forward
writes; the tokens and recursions are those of plain decoding (tested).
Recursion-wise KV sharing is not supported here (as above).

Cost per tick: one loop of U blocks for every row, the readout of every row
(needed by the exit rule), the pre/post stages, and with exits the K/V
projections of loops 1 .. C-1 (their shared base projection is the same
expression for every loop of a block, which XLA computes once; only the
per-depth adapters differ).

Restrictions (ValueError from `check_plan`): exactly one repeated stage, in
cycle order (the loop), and no KV sharing (`model.kv_sharing`: a reader and a
writer of a shared slot differ per row).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recursive_lm.inference import exits
from recursive_lm.inference.sampling import sample_rows
from recursive_lm.model import mor
from recursive_lm.model.attention import Context
from recursive_lm.model.recurrent import initial_state
from recursive_lm.model.recursion import apply_layer, layer_modules


def check_plan(plan) -> int:
  """The index of the plan's loop stage (`Plan.loop`: one repeated stage, cycle
  order), without KV sharing. Raises ValueError naming what does not fit."""
  loop = plan.loop("depth-wise batching")
  if plan.kv_sharing != "none":
    raise ValueError(f"depth-wise batching does not support model.kv_sharing={plan.kv_sharing!r} (needs 'none')")
  return loop.stage


def row_slot(stage, index: jax.Array):
  """The stage's per-depth slot (LoRA, per-depth norms) with every parameter
  gathered per row at index int [B] (None for a stage without slots).

  LoRA factors become A [B, d_in, R], B [B, R, d_out]: `LoRA.__call__`'s
  `x @ A @ B` on x [B, T, d_in] is then a batched matmul, row b with its own
  adapter. Norm scale/bias [B, dim] get singleton axes for the token (and,
  for q/k norms, head) axes they broadcast over.
  """
  if stage.slots is None:
    return None
  slot_def, slot_state = nnx.split(stage.slots)

  def pick(path, a):
    a = a[index]
    names = {str(getattr(p, "key", p)) for p in path}
    if "lora" in names:
      return a
    extra = 2 if names & {"q_norm", "k_norm"} else 1  # q/k norms act on [B, T, N, Hd]; the others on [B, T, D]
    return a.reshape(a.shape[:1] + (1,) * extra + a.shape[1:])

  return nnx.merge(slot_def, jax.tree_util.tree_map_with_path(pick, slot_state))


def row_context(ctx: Context, rope: jax.Array | None, window: jax.Array | None) -> Context:
  """Per-row layer view of the model's Context (per-row positions, cos/sin
  [kinds, B, T, r/2]): row b gets the tables of kind rope[b] and window[b]."""
  rows = jnp.arange(ctx.cos.shape[1])
  rope = jnp.zeros_like(rows) if rope is None else rope
  return ctx._replace(cos=ctx.cos[rope, rows], sin=ctx.sin[rope, rows], window=window)


class Layout:
  """Static facts of the plan the tick needs (hashable by identity of its plan)."""

  def __init__(self, model):
    plan = model.plan
    self.loop_stage = check_plan(plan)
    if model.loop_start is not None:
      raise ValueError(f"depth-wise batching does not support model.reembed_tau={model.cfg.reembed_tau} (its tick "
                       "runs no loop-start hook); use the plain decoder")
    spec = plan.stages[self.loop_stage]
    self.blocks, self.loops = spec.unique_blocks, spec.repeats
    layers = plan.layers()
    self.pre = [l for l in layers if l.stage < self.loop_stage]
    self.post = [l for l in layers if l.stage > self.loop_stage]
    self.loop_layers = plan.stage_layers(self.loop_stage)  # [C * U], slot order: repeat * U + block
    self.rope = np.asarray([l.rope for l in self.loop_layers], np.int32)
    windowed = self.loop_layers[0].window is not None
    self.window = np.asarray([l.window for l in self.loop_layers], np.int32) if windowed else None
    self.recurrent = bool(model.recurrent)
    self.routed = model.routed is not None


def _store(cache, stage: int, slot, rows, pos, entry):
  """cache[stage][n][slot, rows, pos] = entry[n][rows, pos]: the positions just
  written, not the whole gathered entry. slot: int or int [B]."""
  cache = list(cache)
  cache[stage] = {n: a.at[slot, rows, pos].set(entry[n][rows, pos]) for n, a in cache[stage].items()}
  return cache


def _static_layer(model, layer, x, ctx, cache, rows, pos):
  """A layer outside the loop stage, on every row (x [B, 1, D])."""
  stage = model.stages[layer.stage]
  entry = jax.tree.map(lambda a: a[layer.slot], cache[layer.stage])
  x, entry, _ = apply_layer(stage, layer, x, ctx, entry)
  return x, _store(cache, layer.stage, layer.slot, rows, pos, entry)


def _one_loop(model, lay: Layout, x, ctx, cache, loop, rows, pos, e, chosen=None):
  """Loop loop[b] of the shared stage on row b of x [B, 1, D]. chosen [B]
  (routed stage): whether the row's token is a key of its step ('valid')."""
  stage = model.stages[lay.loop_stage]
  if lay.recurrent:
    x = model.injection(x, e)
  for u in range(lay.blocks):
    idx = loop * lay.blocks + u  # [B]: each row's per-depth slot (cycle order)
    block, _, _, _ = layer_modules(stage, lay.loop_layers[u])
    entry = jax.tree.map(lambda a: a[idx, rows], cache[lay.loop_stage])  # [B, S, K, Hd]
    if chosen is not None:
      entry["valid"] = entry["valid"].at[rows, pos].set(chosen)
    window = None if lay.window is None else jnp.asarray(lay.window)[idx]
    lctx = row_context(ctx, jnp.asarray(lay.rope)[idx], window)
    x, entry, _ = block(x, row_slot(stage, idx), lctx, entry)
    cache = _store(cache, lay.loop_stage, idx, rows, pos, entry)
  return x, cache


def _fill_skipped(model, lay: Layout, x, ctx, cache, ran, exited, rows, pos):
  """K/V of the loops a row skips: for rows with exited[b], loops ran[b] ..
  C - 1 at position pos[b], projected from the exit state x."""
  stage = model.stages[lay.loop_stage]
  for layer in lay.loop_layers[lay.blocks:]:  # no row skips loop 0
    block, slot, _, _ = layer_modules(stage, layer)
    k, v = block.project_kv(x, slot, ctx.for_layer(rope=layer.rope, window=layer.window))
    write = (exited & (layer.repeat >= ran))[:, None, None]  # [B, 1, 1] over [B, K, Hd]
    c = dict(cache[lay.loop_stage])
    for n, new in (("k", k), ("v", v)):
      old = c[n][layer.slot, rows, pos]
      c[n] = c[n].at[layer.slot, rows, pos].set(jnp.where(write, new[:, 0].astype(old.dtype), old))
    cache = list(cache)
    cache[lay.loop_stage] = c
  return cache


def _unchosen_after(lay: Layout, cache, ran, leave, rows, pos):
  """Routed stage: a row leaving after `ran` steps is no key of steps ran .. C - 1
  at its position ('valid' off there, whatever the position held before)."""
  c = dict(cache[lay.loop_stage])
  steps = np.repeat(np.arange(lay.loops), lay.blocks)  # [C * U]: each slot's step
  old = c["valid"][:, rows, pos]  # [C * U, B]
  c["valid"] = c["valid"].at[:, rows, pos].set(old & ~(leave[None] & (steps[:, None] >= ran[None])))
  cache = list(cache)
  cache[lay.loop_stage] = c
  return cache


def init_state(model, slots: int, rule) -> dict:
  """Per-slot state carried between ticks (and device calls): the residual
  stream in the loop x [B, 1, D], the next loop to run loop [B], the previous
  loop's log-probabilities prev [B, V] (for rules that compare loops; [B, 0]
  otherwise), for recurrent plans the prelude output e [B, 1, D], and for
  token routing the depth - 1 each row's token was given, given [B], with its
  probability g [B]."""
  dtype, d = jnp.dtype(model.cfg.compute_dtype), model.cfg.d_model
  keep_prev = rule is not None and getattr(rule, "kind", None) != "confidence"
  return {"x": jnp.zeros((slots, 1, d), dtype), "loop": jnp.zeros((slots,), jnp.int32),
          "prev": jnp.zeros((slots, model.cfg.vocab_size if keep_prev else 0), jnp.float32),
          "e": jnp.zeros((slots, 1, d), dtype), "given": jnp.zeros((slots,), jnp.int32),
          "g": jnp.zeros((slots,), jnp.float32)}


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "ticks", "max_top_k", "exit_rule"),
                   donate_argnames=("cache", "dw"))
def decode(graphdef, state, cache, dw, tokens, positions, fresh, seeds, steps, temperature, top_k, remaining, eos_id,
           *, layout: Layout, ticks: int, max_top_k: int, exit_rule=None):
  """Up to `ticks` depth-wise ticks of every slot.

  tokens [B]: each slot's last token (the one it is computing), at position
  positions [B]; fresh [B]: slots admitted since the last call (they start
  that token at loop 0; the others continue from dw); steps [B]: the index of
  the next token a slot draws; remaining [B]: tokens it may still draw (0: no
  request); eos_id int32 [] (-1: none). A slot stops after `remaining` tokens
  or at EOS (it keeps running, as scratch, at a frozen position).
  Returns (cache, dw, drawn int32 [B, ticks]: the token a slot drew at each
  tick or -1, loops int32 [B, ticks]: the loops that token ran).
  """

  model = nnx.merge(graphdef, state)
  lay = layout
  b = tokens.shape[0]
  rows = jnp.arange(b)
  dtype = jnp.dtype(model.cfg.compute_dtype)
  last_loop = lay.loops

  def cond(carry):
    return (carry[0] < ticks) & jnp.any(carry[5])

  def body(carry):
    i, cache, dw, tok, pos, alive, count, out, used = carry
    ctx, _ = model.context(1, pos)
    # Entering rows (loop 0): embed the token and run the stages before the loop.
    enter = dw["loop"] == 0
    x0 = model.embed(tok[:, None], dtype)
    for layer in lay.pre:
      x0, cache = _static_layer(model, layer, x0, ctx, cache, rows, pos)
    e = dw["e"]
    if lay.recurrent:
      e = jnp.where(enter[:, None, None], x0, e)
      x0 = initial_state(model.cfg.recurrent.init_state, x0, None, ctx.positions)
    x = jnp.where(enter[:, None, None], x0, dw["x"])
    given, g_tok = dw["given"], dw["g"]
    if lay.routed:  # the router is the exit rule: whether the row's token takes this step
      mcfg = model.cfg.mor
      if mcfg.routing == "token":
        given0, g0 = mor.token_depths(model.router, x0)
        given, g_tok = jnp.where(enter, given0[:, 0], given), jnp.where(enter, g0[:, 0], g_tok)
      token = (given[:, None], g_tok[:, None]) if mcfg.routing == "token" else None
      # A continuing row was chosen for this step when it stayed (the same decision on the same state).
      chosen, g = mor.causal_choice(model.router, mcfg, x, dw["loop"], jnp.ones((b, 1), bool), token)
      run = jnp.where(enter, chosen[:, 0], True)
      f, cache = _one_loop(model, lay, x, ctx, cache, dw["loop"], rows, pos, e, run)
      x = mor.apply_update(x, f, run[:, None], g, mcfg)
      ran = dw["loop"] + run
      # Whether the token takes its next step; a token that does not is read out now and leaves the slot.
      again, _ = mor.causal_choice(model.router, mcfg, x, jnp.minimum(ran, last_loop - 1), jnp.ones((b, 1), bool),
                                   token)
      stays = run & (ran < last_loop) & again[:, 0]
      cache = _unchosen_after(lay, cache, ran, ~stays, rows, pos)
    else:  # One loop, each row at its own depth.
      x, cache = _one_loop(model, lay, x, ctx, cache, dw["loop"], rows, pos, e)
      ran = dw["loop"] + 1
    prev = dw["prev"]
    if exit_rule is not None:
      logits = model.readout(x[:, -1])  # [B, V]
      logp = jax.nn.log_softmax(logits, axis=-1)
      ruled = exits.decide(exit_rule, logp, prev if prev.shape[-1] else logp, ran, pos) & (ran < last_loop)
      prev = logp if prev.shape[-1] else prev
      cache = _fill_skipped(model, lay, x, ctx, cache, ran, ruled, rows, pos)
    else:
      ruled = jnp.zeros((b,), bool)
    leave = ~stays if lay.routed else ruled | (ran >= last_loop)
    # The stages after the loop, with exited rows frozen at their exit state.
    out_x = x
    for layer in lay.post:
      new, cache = _static_layer(model, layer, out_x, ctx, cache, rows, pos)
      out_x = jnp.where(ruled[:, None, None], out_x, new)
    if exit_rule is None or lay.post:
      logits = model.readout(out_x[:, -1])
    nxt = sample_rows(logits, seeds, steps + count, temperature, top_k, max_top_k)
    emit = leave & alive
    out = out.at[:, i].set(jnp.where(emit, nxt, -1))
    used = used.at[:, i].set(jnp.where(emit, ran, 0))
    tok, pos = jnp.where(emit, nxt, tok), jnp.where(emit, pos + 1, pos)
    count = count + emit
    alive = alive & ~(emit & ((count >= remaining) | (nxt == eos_id)))
    dw = {"x": x.astype(dtype), "loop": jnp.where(leave, 0, ran), "prev": prev, "e": e, "given": given, "g": g_tok}
    return i + 1, cache, dw, tok, pos, alive, count, out, used

  dw = dict(dw, loop=jnp.where(fresh, 0, dw["loop"]))
  carry = (jnp.int32(0), cache, dw, tokens, positions, remaining > 0, jnp.zeros((b,), jnp.int32),
           jnp.full((b, ticks), -1, jnp.int32), jnp.zeros((b, ticks), jnp.int32))
  _, cache, dw, _, _, _, _, out, used = jax.lax.while_loop(cond, body, carry)
  return cache, dw, out, used


class Decoder:
  """The engine's depth-wise decode: per-slot state kept on the device between
  calls (`Engine(depthwise=True)`). A call runs `ticks` steps (default
  chunk * loops, so a slot running every loop draws `chunk` tokens per
  call); slots freed inside a call are refilled after it."""

  def __init__(self, model, slots: int, exit_rule: Any = None):
    self.layout = Layout(model)  # ValueError for a plan it cannot batch by depth
    if self.layout.routed and exit_rule is not None:
      raise ValueError("a model with routers (model.mor) takes no exit rule: its routers are the exit rule")
    self.exit_rule = exit_rule
    self.loops = self.layout.loops
    self.state = init_state(model, slots, exit_rule)
    self.fresh = np.zeros((slots,), bool)
    self.ticks: int | None = None  # None: chunk * loops

  def admitted(self, slot: int) -> None:
    """A new request took `slot`: its first decoded token starts at loop 0."""
    self.fresh[slot] = True

  def __call__(self, graphdef, state, cache, tokens, positions, seeds, steps, temperature, top_k, remaining,
               eos_id, *, chunk: int, max_top_k: int):
    """(cache, drawn [B, ticks], loops [B, ticks]); see `decode`."""
    cache, self.state, drawn, used = decode(
        graphdef, state, cache, self.state, tokens, positions, self.fresh.copy(), seeds, steps, temperature, top_k,
        remaining, eos_id, layout=self.layout, ticks=self.ticks or chunk * self.loops, max_top_k=max_top_k,
        exit_rule=self.exit_rule)
    self.fresh[:] = False
    return cache, drawn, used
