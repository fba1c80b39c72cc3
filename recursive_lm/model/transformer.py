"""The language model: embed -> stages of the depth plan -> final norm -> head.

Parameter initialisation (std of a normal unless stated):

  parameter                       shape            init
  ------------------------------  ---------------  ------------------------------------
  embed.table                     [V, D]           D^-1/2 (tied head logits ~ unit scale)
  q, k, v, gate, up kernels       [D, *]           fan-in: D^-1/2
  o kernel                        [H*Hd, D]        (H*Hd)^-1/2 / sqrt(2 L_eff)
  down kernel                     [F, D]           F^-1/2 / sqrt(2 L_eff)
  norm scales / biases            [D]              1 / 0
  LoRA a                          [d_in, R]        d_in^-1/2
  LoRA b                          [R, d_out]       0 (relaxed model == tied model at init)
  head kernel (untied only)       [D, V]           D^-1/2

L_eff is the effective depth of the plan, so deep looped models start with
the same residual-stream scale as an untied model of the same depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recursive_lm import axes, sharding
from recursive_lm import plan as plan_lib
from recursive_lm.config import ModelConfig
from recursive_lm.model import kernels, moe, mor
from recursive_lm.model.attention import Context, KVProjection
from recursive_lm.model.block import Block, DepthSlot
from recursive_lm.model.moeut_block import MoEUTBlock
from recursive_lm.model.layers import Dense, Embed, Norm, rope_tables
from recursive_lm.model.recurrent import Injection, initial_state
from recursive_lm.model import walk
from recursive_lm.model.kv import KVStore
from recursive_lm.model.recursion import StageModule, run_recurrent, run_stage


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.plan = plan_lib.from_config(cfg)
    pd = jnp.dtype(cfg.param_dtype)
    total = self.plan.depth
    self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.d_model**-0.5, rngs, pd,
                       scale=cfg.d_model**0.5 if cfg.scale_embeddings else 1.0)
    stages = []
    for spec in self.plan.stages:
      shared_norms = not (spec.per_depth_norms and spec.repeats > 1)
      # Adapters and per-depth norms only where weights are reused: a stage
      # run once has nothing to relax.
      block_cls = MoEUTBlock if cfg.block == "moeut" else Block  # chosen at build time
      if self.plan.kv_sharing == "none":
        with_slots = spec.repeats > 1 and DepthSlot.needed(cfg, not shared_norms)
        make_slot = (lambda r: DepthSlot(cfg, not shared_norms, r)) if with_slots else None
        stages.append(StageModule(spec, lambda r: block_cls(cfg, shared_norms, total, r), make_slot, rngs))
      else:  # K/V projections and adapters only where a KV slot is written (validation: dense blocks)
        i = len(stages)
        writers = tuple(k for k in range(spec.unique_blocks) if self.plan.block_writes_kv(i, k))
        with_slots = spec.repeats > 1 and DepthSlot.needed(cfg, not shared_norms, kv=False)
        make_slot = (lambda r: DepthSlot(cfg, not shared_norms, r, kv=False)) if with_slots else None
        with_kv_lora = spec.repeats > 1 and DepthSlot.needed(cfg, False, kv=True)
        stages.append(StageModule(
            spec, lambda r: Block(cfg, shared_norms, total, r, own_kv=False), make_slot, rngs,
            make_kv=lambda r: KVProjection(cfg, r), kv_blocks=writers,
            make_kv_lora=(lambda r: DepthSlot(cfg, False, r, kv=True)) if with_kv_lora else None,
            kv_depths=tuple(l.slot for l in self.plan.stage_layers(i) if l.kv_write)))
    self.stages = nnx.List(stages)
    self.loop = self.plan.looped  # the plan's loop record (None: nothing repeats)
    self.recurrent = self.loop is not None and self.loop.inject  # a core with input injection (Huginn)
    self.injection = nnx.data(Injection(cfg, rngs) if self.recurrent else None)
    # Mixture-of-Recursions: routers on the loop (validation checked the plan).
    self.routed = self.plan.loop("model.mor.routing").stage if self.plan.routed else None
    self.router = nnx.data(None if self.routed is None else mor.Router(cfg, self.loop.repeats, rngs))
    self.kv = KVStore(self.plan, cfg.num_kv_heads, cfg.head_dim)  # the cache's layout (`model.kv`)
    self.rope_bases, self.depth_data = layer_kinds(cfg, self.plan)
    self.rope_scalings = rope_scalings(cfg, len(self.rope_bases))
    self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.norm_offset, param_dtype=pd)
    self.head = None if cfg.tie_embeddings else Dense(cfg.d_model, cfg.vocab_size, axes.EMBED, axes.VOCAB,
                                                      cfg.d_model**-0.5, rngs, pd, kernels.dense_kernel(cfg))

  @property
  def loop_start(self):
    """The loop-start hook (x, j) -> x of the walk and the scan, or None when
    nothing happens between loops but the loop itself. The recurrent core's
    injection is separate (it needs the prelude output: `recurrent.loop_start`)."""
    return self.reembed if self.cfg.reembed_tau > 0 else None

  def reembed(self, x: jax.Array, j) -> jax.Array:
    """Loop re-embedding (model.reembed_tau, Grokked transformers): before
    loop j > 0, x [B, T, D] <- x + softmax(tau x E^T) E, the stream pulled
    towards the embeddings of the tokens it predicts. j: a Python int (the
    walk) or traced (the scan)."""
    def pull(x):
      table = self.embed.table[...].astype(x.dtype)
      p = jax.nn.softmax((self.cfg.reembed_tau * (x @ table.T)).astype(jnp.float32), axis=-1)
      return x + (p.astype(x.dtype) @ table)
    if isinstance(j, int):
      return pull(x) if j > 0 else x
    return jax.lax.cond(j > 0, pull, lambda x: x, x)

  def regulariser(self, aux: dict) -> tuple[jax.Array, dict]:
    """Auxiliary training loss from the blocks' aux outputs (e.g. MoE balance)
    and its metrics (zero and {} for dense blocks)."""
    loss, metrics = moe.balance_loss(aux, self.plan, self.cfg)
    if self.routed is None:
      return loss, metrics
    r_loss, r_metrics = mor.router_loss(aux, self.cfg.mor, self.loop.repeats)
    return loss + r_loss, {**metrics, **r_metrics}

  def init_cache(self, batch: int, max_len: int, dtype=None, loops: int | None = None) -> list[dict]:
    """Zeroed KV caches, one entry per distinct KV slot of the plan: per stage
    {'k','v'} [U*C, B, S, Kv, Hd] without sharing; with model.kv_sharing one
    [{'k','v'} [kv_slots, B, S, Kv, Hd]] for the whole depth. With routers
    (model.mor) per stage, sharing or not, and the routed stage's entry also
    holds 'valid' [U*C, B, S] bool (`mor.run_causal`). loops: a
    recurrent core run that many times at test time gets U * loops entries
    (one per iteration's layer; pass the same `loops` to `__call__`)."""
    dtype = dtype or jnp.dtype(self.cfg.compute_dtype)
    if loops is not None:
      self.check_loops(loops)
    return self.kv.init(batch, max_len, dtype, loops)

  def check_loops(self, loops) -> None:
    """ValueError unless this is a recurrent plan and `loops` a count >= 1 (or traced)."""
    if not self.recurrent:
      raise ValueError(f"loops={loops}: only a recurrent plan takes a loop count (plan {self.cfg.plan.preset!r})")
    if isinstance(loops, (int, np.integer)) and loops < 1:
      raise ValueError(f"loops={loops} must be >= 1")

  def __call__(self, tokens: jax.Array, cache: list[dict] | None = None, cache_index: jax.Array | None = None,
               unrolled: bool = False, loops: jax.Array | int | None = None, key: jax.Array | None = None,
               loop_states: bool = False, logits_at: jax.Array | None = None, routing: str | None = None):
    """tokens [B, T] int -> (logits [B, T, V] float32, cache, aux).

    logits_at: int [B], read out only position logits_at[b] of row b (logits
    [B, 1, V]): a prefill needs only its last position's, and the readout of
    a large vocabulary at every prompt position would cost more than the layers.

    With a cache, the tokens sit at positions cache_index + [0, T) and their
    keys/values are written there; cache_index is a scalar or one per row [B]
    (rows at different positions). aux maps diagnostic names to [L_eff] arrays;
    with model.mor routing it also holds 'router_loss' (scalar) and
    'router_depth' [B, T] (`recursive_lm.model.mor.run_routed`).

    Recurrent plans: loops None runs the core the plan's repeats times (any
    path, caches included); an int or traced int runs it that many times
    with truncated backprop (`run_recurrent`; changing it does not
    recompile; aux then holds the core's last model.recurrent.backprop_depth
    iterations); one count per row [B] runs each row its own count. With a
    cache, loops is a Python int and the cache comes from
    `init_cache(loops=loops)` (U * loops core entries): any count, more than
    trained included, decodes with the model's parameters, iteration j with
    repeat min(j, C - 1)'s per-depth slots. key: the random initial state's
    key (None: fixed).

    loop_states: also return, as aux["loop_states"] [N, B, T, D], the residual
    stream after each of the N loop boundaries of the repeated cycle-order
    stages (in depth order, as `inference.exits.loop_boundaries`), for the
    per-loop readout losses (train.exit_loss_weights). Not with a loop count.

    routing (models with model.mor routers): 'topk' routes as in training
    (top-k over the sequence; not causal), 'threshold' as in generation
    (each token decides alone: `mor.run_causal`); None: 'topk' without a
    cache, 'threshold' with one (the only routing a cache takes).
    """
    cfg = self.cfg
    ctx, depth_arrays = self.context(tokens.shape[1], cache_index)
    # Stage boundaries pin x [B, T, D] to batch-sharded rows (no-op without a mesh).
    x = sharding.constrain_residual(self.embed(tokens, jnp.dtype(cfg.compute_dtype)))
    states = [] if loop_states else None

    def keep_state(x, j, frozen):  # the walk's loop-end hook: the state after every loop but the last
      if j < self.loop.repeats - 1:
        states.append(x)
      return frozen

    collect = walk.Hooks(loop_end=keep_state) if loop_states else walk.NO_HOOKS
    if self.kv.shared:  # layers read each other's K/V: the whole depth in one walk over one store
      x, cache, aux, _ = walk.walk(self, self.plan.layers(), x, ctx, cache, remat=cfg.remat,
                                   hooks=collect._replace(loop_start=self.loop_start))
      if loop_states:
        aux = {**aux, "loop_states": _stack_states(states, x)}
      return self.readout(_rows_at(sharding.constrain_residual(x), logits_at)), cache, aux
    if loops is not None:
      self.check_loops(loops)
      if loop_states:
        raise ValueError("loop_states: per-loop states are not collected under a run-time loop count")
      if cache is not None:
        self.check_loop_cache(loops, cache)
    routing = routing or ("topk" if cache is None else "threshold")
    if routing not in ("topk", "threshold") or (routing == "topk" and cache is not None):
      raise ValueError(f"routing={routing!r}: 'topk' (training's routing, not causal: without a KV cache) or "
                       "'threshold' (generation's)")
    new_cache, auxes, router_aux = [], [], {}
    for i, stage in enumerate(self.stages):
      c = None if cache is None else cache[i]
      inject = None
      if self.recurrent and i == self.loop.stage:  # the core: inject the prelude output e into every iteration
        e = x
        x = initial_state(cfg.recurrent.init_state, e, key, ctx.positions)
        inject = lambda s, j, e=e: self.injection(s, e)
      elif i == getattr(self.loop, "stage", None):
        inject = self.loop_start
      core_loops = loops if self.recurrent and i == self.loop.stage else None
      if i == self.routed and routing == "threshold":
        x, c, aux, router_aux = mor.run_causal(stage, self.router, x, ctx, self.plan.stage_layers(i), cfg.mor,
                                               cfg.remat, c)
      elif i == self.routed:
        x, aux, router_aux = mor.run_routed(stage, self.router, x, ctx, self.plan.stage_layers(i), cfg.mor,
                                            cfg.remat)
      elif core_loops is not None and cache is None:
        x, aux = run_recurrent(stage, self.injection, x, e, ctx, depth_arrays[i], cfg.remat, loops,
                               cfg.recurrent.backprop_depth)
      elif unrolled or not cfg.scan or stage.shared_kv:  # shared K/V here: routed plans (every layer writes)
        layers = self.plan.stage_layers(i) if core_loops is None else self.plan.loop_layers(i, core_loops)
        hooks = collect._replace(loop_start=inject)
        whole = None if cache is None else [c if n == i else None for n in range(len(self.stages))]
        x, whole, aux, _ = walk.walk(self, layers, x, ctx, whole, remat=cfg.remat, hooks=hooks)
        c = None if cache is None else whole[i]
      else:
        x, c, aux = run_stage(stage, x, ctx, c, depth_arrays[i], cfg.remat, inject, states, core_loops)
      x = sharding.constrain_residual(x)
      new_cache.append(c)
      auxes.append(aux)
    aux = {**jax.tree.map(lambda *a: jnp.concatenate(a), *auxes), **router_aux}
    if loop_states:
      aux["loop_states"] = _stack_states(states, x)
    return self.readout(_rows_at(x, logits_at)), (new_cache if cache is not None else None), aux

  def check_loop_cache(self, loops, cache: list[dict]) -> None:
    """ValueError unless `loops` is a Python int matching the cache's core entries."""
    u = self.loop.unique_blocks
    have = cache[self.loop.stage]["k"].shape[0]
    if not isinstance(loops, (int, np.integer)) or have != u * loops:
      raise ValueError(f"loops={loops} with a KV cache needs a Python int and the cache of "
                       f"init_cache(loops=...): {u} core blocks x loops entries, this cache has {have}")

  def context(self, t: int, cache_index: jax.Array | None = None) -> tuple[Context, list[dict]]:
    """The Context of T tokens starting at cache_index (0 without a cache; a
    scalar, or one start per row [B] giving per-row positions [B, T]), with
    rotary tables for every kind, and per stage its per-depth data {name: [U*C]}."""
    start = 0 if cache_index is None else cache_index
    positions = jnp.asarray(start, jnp.int32)[..., None] + jnp.arange(t, dtype=jnp.int32)
    positions = positions if positions.ndim == 2 else positions.reshape(t)
    rot = int(self.cfg.head_dim * self.cfg.rope_fraction)
    tables = [rope_tables(positions, rot, base, scaling) for base, scaling in zip(self.rope_bases, self.rope_scalings)]
    ctx = Context(jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables]), positions, cache_index)
    return ctx, [{k: jnp.asarray(v, jnp.int32) for k, v in d} for d in self.depth_data]

  def readout(self, x: jax.Array) -> jax.Array:
    """Final norm and output head: residual stream [..., T, D] -> logits [..., T, V] float32."""
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.float32)


def _stack_states(states: list, x: jax.Array) -> jax.Array:
  """Loop-boundary states -> [N, B, T, D] (N = 0 for a plan without loops)."""
  return jnp.stack(states) if states else jnp.zeros((0,) + x.shape, x.dtype)


def _rows_at(x: jax.Array, at: jax.Array | None) -> jax.Array:
  """x [B, T, D] -> x[b, at[b]] as [B, 1, D] (x itself when at is None)."""
  return x if at is None else jnp.take_along_axis(x, jnp.asarray(at, jnp.int32)[:, None, None], axis=1)


def rope_scalings(cfg: ModelConfig, kinds: int) -> tuple:
  """Per rotary kind: the context-extension rule (`rope_tables` scaling) or None.
  It applies to the global kind (0) only, as in Gemma 3 and Llama 3.1 (whose
  layers are all global); local layers keep their plain base."""
  if cfg.rope_scaling == "none":
    scaling = None
  elif cfg.rope_scaling == "linear":
    scaling = ("linear", cfg.rope_scaling_factor)
  else:
    scaling = ("llama3", cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
               float(cfg.rope_original_max_len))
  return (scaling,) + (None,) * (kinds - 1)


def layer_kinds(cfg: ModelConfig, plan: plan_lib.Plan) -> tuple[tuple[float, ...], tuple]:
  """Rotary bases, and per stage the per-depth data ((name, U*C ints), ...)
  read from the plan's layer records (rotary kind, window): hashable Python, so
  it stays static module metadata, not model state. Models without windows
  carry no per-depth data."""
  if not cfg.sliding_window:
    return (cfg.rope_base,), tuple(() for _ in plan.stages)
  bases = (cfg.rope_base, cfg.rope_base_local or cfg.rope_base)
  data = tuple((("rope", tuple(l.rope for l in layers)), ("window", tuple(l.window for l in layers)))
               for layers in (plan.stage_layers(i) for i in range(len(plan.stages))))
  return bases, data
