"""Parameter and FLOP accounting: what a recursive model stores versus what it runs.

A tied model stores each unique block once but runs it at several depths, so
two numbers matter: *stored* (unique) parameters, which set memory and
checkpoint size, and *used-per-token* parameters, which set compute. Every
count here is read from parameter shapes of the real model built abstractly
(`nnx.eval_shape`, no arrays allocated), so the accounting cannot drift from
the model code; the only hand formula is attention's T-dependent term.

Names:
  unique_params     stored parameters that are not LoRA factors (embedding,
                    blocks, norms, per-depth norms, untied head)
  lora_params       stored LoRA factors (all depth slots; under KV sharing the
                    K/V adapters only of the layers that write a KV slot)
  total_params      unique_params + lora_params (everything in a checkpoint)
  embedding_params  the token embedding table [V, D] (part of unique_params)
  kv_slots          distinct KV-cache entries (model.kv_sharing); the cache
                    holds kv_cache_bytes_per_token bytes per token of context
  untied_params     unique_params of the same architecture with one block per
                    effective layer, no LoRA, no KV sharing and no routers (the
                    vanilla model of equal depth)
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from recursive_lm import config as config_lib
from recursive_lm.config import Config, ModelConfig
from recursive_lm.model import moeut_block
from recursive_lm.model.layers import LoRAParam, NormParam
from recursive_lm.model.transformer import Transformer


def _model_cfg(cfg: Config | ModelConfig) -> ModelConfig:
  return cfg.model if isinstance(cfg, Config) else cfg


def abstract_model(cfg: Config | ModelConfig) -> Transformer:
  """The model with jax.ShapeDtypeStruct leaves: shapes only, nothing allocated."""
  mcfg = _model_cfg(cfg)
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: Transformer(mcfg, nnx.Rngs(0)))


def _size(x) -> int:
  n = 1
  for d in x.shape:
    n *= int(d)
  return n


def _sum(state) -> int:
  return sum(_size(x) for x in jax.tree.leaves(state))


def count_params(model: Transformer) -> dict[str, int]:
  """Stored parameter counts of a (concrete or abstract) model; see module doc."""
  lora = _sum(nnx.state(model, LoRAParam))
  total = _sum(nnx.state(model, nnx.Param))
  return {
      "total_params": total,
      "unique_params": total - lora,
      "lora_params": lora,
      "embedding_params": _size(model.embed.table),
  }


def untied_params(cfg: Config | ModelConfig) -> int:
  """unique_params of the untied counterpart: vanilla plan with one block per
  effective layer, no LoRA, no KV sharing, everything else equal."""
  mcfg = _model_cfg(cfg)
  depth = abstract_model(mcfg).plan.depth
  untied = dataclasses.replace(
      mcfg,
      plan=config_lib.PlanConfig(preset="vanilla", num_layers=depth, repeats=1, per_depth_norms=False),
      lora=dataclasses.replace(mcfg.lora, rank=0, ranks=()), kv_sharing="none", mor=config_lib.MoRConfig())
  return count_params(abstract_model(untied))["unique_params"]


def _dense_matmul_params(state, cfg: ModelConfig) -> int:
  """Parameters of a dense block/slot state that multiply activations (not norms)."""
  return _sum(nnx.state(state, nnx.All(nnx.Param, nnx.Not(NormParam))))


# Extension point: model.block -> weights one token multiplies with in a
# (stacked) block or slot state. Dense blocks use every weight; a MoE block
# must count only its active experts (top_k / experts of the expert weights)
# and register itself here.
ACTIVE_MATMUL_PARAMS = {"dense": _dense_matmul_params, "moeut": moeut_block.active_matmul_params}


def step_fractions(mcfg: ModelConfig, seq_len: int | None = None) -> tuple[float, ...] | None:
  """Mixture-of-Recursions: share of a row's tokens each recursion step of the
  routed stage runs on: k_r / T with the gathered sizes k_r of
  `recursive_lm.model.mor.step_sizes` at seq_len, or the configured
  capacities without one. None without routing."""
  if mcfg.mor.routing == "none":
    return None
  if seq_len is None:
    return tuple(mcfg.mor.capacities)
  from recursive_lm.model.mor import step_sizes
  return tuple(k / seq_len for k in step_sizes(mcfg.mor.capacities, seq_len))


def matmul_params_per_token(cfg: Config | ModelConfig, model: Transformer | None = None,
                            seq_len: int | None = None) -> float:
  """Matmul weights one token passes through on its way up the model.

  A shared block counts once per effective layer it runs at: stage blocks are
  stored [U, ...] and each runs C times, so a stage contributes C * (all its
  block kernels). LoRA factors are stored per depth slot [U*C, ...] and each
  slot runs once, so they count as stored. The LM head (D x V, tied or not)
  counts once; the embedding lookup is a gather and norms are elementwise, so
  neither counts. With model.kv_sharing, K/V projections and K/V adapters
  count once per layer that writes a KV slot; the layers that read one have
  neither. A recurrent
  plan's input injection counts once per core iteration (plan repeats).

  Mixture-of-Recursions (active weights): recursion step r of the routed stage
  runs on a share a_r of the tokens (`step_fractions`), so its blocks and
  depth slots count a_r times instead of once; the routers ([D, R], run on
  every token) count once. Then the count is a mean over tokens, a float.
  """
  mcfg = _model_cfg(cfg)
  if mcfg.block not in ACTIVE_MATMUL_PARAMS:
    raise NotImplementedError(f"FLOP accounting for model.block={mcfg.block!r} is not registered in "
                              "recursive_lm.analysis.accounting.ACTIVE_MATMUL_PARAMS")
  active = ACTIVE_MATMUL_PARAMS[mcfg.block]
  model = model if model is not None else abstract_model(mcfg)
  n = mcfg.d_model * mcfg.vocab_size
  fractions = step_fractions(mcfg, seq_len)
  for i, (spec, stage) in enumerate(zip(model.plan.stages, model.stages)):
    slots = _dense_matmul_params(stage.slots, mcfg) if stage.slots is not None else 0
    if i == model.routed:  # sum(fractions): recursions a token takes, on average
      n += sum(fractions) * (active(stage.blocks, mcfg) + slots / spec.repeats)
    else:
      n += spec.repeats * active(stage.blocks, mcfg) + slots
    if stage.shared_kv:
      share = (lambda l: fractions[l.repeat]) if i == model.routed else (lambda l: 1)
      n += _shared_kv_params(model.plan.stage_layers(i), stage, share)
  if model.injection is not None:  # recurrent plans: the input injection runs once per core iteration
    n += model.loop.repeats * _dense_matmul_params(model.injection, mcfg)
  if model.router is not None:
    n += _size(model.router.w)
  return n


def _shared_kv_params(layers, stage, share=lambda layer: 1):
  """Per-token K/V weights of a stage under model.kv_sharing: the K/V
  projections (stored [W, ...] for the W writing blocks) run once per layer
  that writes, and so do the K/V adapters (stored [Wd, ...], one per writing
  layer). The layers that only read K/V store and run neither. share: the
  share of tokens a layer runs on (Mixture-of-Recursions; 1 otherwise)."""
  writers = [l for l in layers if l.kv_write]
  writes = sum(share(l) for l in writers)
  n = _sum(nnx.state(stage.kv)) // len(stage.kv_blocks) * writes if stage.kv is not None else 0
  if stage.kv_lora is not None:
    n += _sum(nnx.state(stage.kv_lora)) // len(writers) * writes
  return n


def kv_cache_bytes_per_token(cfg: Config | ModelConfig, model: Transformer | None = None) -> int:
  """Bytes the KV cache holds per token of context: one K and one V of
  [Kv, Hd] in the compute dtype per distinct KV slot (`plan.kv_slots`)."""
  import numpy as np
  mcfg = _model_cfg(cfg)
  model = model if model is not None else abstract_model(mcfg)
  return model.plan.kv_slots * 2 * mcfg.num_kv_heads * mcfg.head_dim * np.dtype(mcfg.compute_dtype).itemsize


def flops_per_token(cfg: Config | ModelConfig, seq_len: int, model: Transformer | None = None,
                    all_recursions: bool = False) -> int:
  """Training FLOPs per token (forward + backward), model FLOPs only.

    flops = 6 * N_used + 6 * L_eff * T * (H * Hd)

  N_used is `matmul_params_per_token`: a matmul with N weights costs 2 N FLOPs
  per token forward and 4 N backward (grads w.r.t. input and weight), hence 6.
  Attention scores and the weighted sum of values, per token and layer, cost
  2 * T * H * Hd FLOPs each forward over a full T x T window (QK^T and AV);
  causal masking halves the useful work, so forward is 2 * T * H * Hd and
  forward + backward is 3x that: 6 * T * H * Hd per layer, times L_eff
  layers. T is the context length (`seq_len`). Rematerialisation re-runs the
  forward and is not counted (that is hardware FLOPs, not model FLOPs).

  Mixture-of-Recursions (active FLOPs): a layer of recursion step r runs on
  k_r of the T tokens, which attend among themselves, so per token of the
  sequence it costs its matmuls times k_r / T (`matmul_params_per_token`)
  and attention 6 * k_r^2 / T * H * Hd (6 * k_r k_0 / T * H * Hd when
  model.kv_sharing='recursion' has it read step 0's keys). `all_recursions=True` counts every
  token through every step instead (the masked execution's cost).
  """
  mcfg = _model_cfg(cfg)
  model = model if model is not None else abstract_model(mcfg)
  per_layer = 6 * seq_len * mcfg.num_heads * mcfg.head_dim
  fractions = step_fractions(mcfg, seq_len)
  if fractions is None or all_recursions:
    attn = model.plan.depth * per_layer
  else:
    # step r's queries (a share a_r) attend to the keys of its own tokens, or of step 0's under KV sharing
    routed = model.plan.stages[model.routed]
    keys = [fractions[0] if model.stages[model.routed].shared_kv else a for a in fractions]
    attn = (model.plan.depth - routed.depth) * per_layer + routed.unique_blocks * per_layer * sum(
        a * k for a, k in zip(fractions, keys))
  n_used = matmul_params_per_token(mcfg, model, None if all_recursions else seq_len)
  if fractions is not None and all_recursions:
    routed = model.plan.stages[model.routed]
    n_used = matmul_params_per_token(dataclasses.replace(
        mcfg, mor=dataclasses.replace(mcfg.mor, capacities=(1.0,) * routed.repeats)), model)
  return int(round(6 * n_used + attn))


def describe(cfg: Config) -> dict:
  """Summary of a config's model: parameter counts, depth plan, FLOPs/token.

  Keys: unique_params, untied_params, lora_params, total_params,
  embedding_params, effective_depth, unique_blocks, flops_per_token (training,
  at seq_len; None for a block type not in ACTIVE_MATMUL_PARAMS), seq_len, kv_sharing, kv_slots (distinct
  KV-cache entries), kv_cache_bytes_per_token, plan (list of {depth, stage, block, repeat, kv_slot}); with
  model.mor routing also mor_routing, mor_capacities, mor_tokens_per_step (k_r at seq_len),
  flops_per_token_all_recursions (every token through every step) and active_flops_ratio.
  """
  model = abstract_model(cfg)
  counts = count_params(model)
  try:
    flops = flops_per_token(cfg, cfg.data.seq_len, model)
  except NotImplementedError:  # a block type without FLOP accounting yet: say so rather than guess
    flops = None
  return {
      "unique_params": counts["unique_params"],
      "untied_params": untied_params(cfg),
      "lora_params": counts["lora_params"],
      "total_params": counts["total_params"],
      "embedding_params": counts["embedding_params"],
      "effective_depth": model.plan.depth,
      "unique_blocks": model.plan.unique_blocks,
      "flops_per_token": flops,
      "seq_len": cfg.data.seq_len,
      "kv_sharing": cfg.model.kv_sharing,
      "kv_slots": model.plan.kv_slots,
      "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg, model),
      "plan": model.plan.describe(),
      **_describe_mor(cfg, model, flops),
  }


def _describe_mor(cfg: Config, model: Transformer, flops) -> dict:
  """describe()'s Mixture-of-Recursions keys (none without routing)."""
  mor = cfg.model.mor
  if mor.routing == "none":
    return {}
  from recursive_lm.model.mor import step_sizes
  full = flops_per_token(cfg, cfg.data.seq_len, model, all_recursions=True)
  return {"mor_routing": mor.routing, "mor_capacities": list(mor.capacities),
          "mor_tokens_per_step": list(step_sizes(mor.capacities, cfg.data.seq_len)),
          "flops_per_token_all_recursions": full, "active_flops_ratio": flops / full}
