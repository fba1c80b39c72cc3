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
                    effective layer, no LoRA and no KV sharing (the vanilla model
                    of equal depth)
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
      lora=dataclasses.replace(mcfg.lora, rank=0, ranks=()), kv_sharing="none")
  return count_params(abstract_model(untied))["unique_params"]


def _dense_matmul_params(state, cfg: ModelConfig) -> int:
  """Parameters of a dense block/slot state that multiply activations (not norms)."""
  return _sum(nnx.state(state, nnx.All(nnx.Param, nnx.Not(NormParam))))


# Extension point: model.block -> weights one token multiplies with in a
# (stacked) block or slot state. Dense blocks use every weight; a MoE block
# must count only its active experts (top_k / experts of the expert weights)
# and register itself here.
ACTIVE_MATMUL_PARAMS = {"dense": _dense_matmul_params, "moeut": moeut_block.active_matmul_params}


def matmul_params_per_token(cfg: Config | ModelConfig, model: Transformer | None = None) -> int:
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
  """
  mcfg = _model_cfg(cfg)
  if mcfg.block not in ACTIVE_MATMUL_PARAMS:
    raise NotImplementedError(f"FLOP accounting for model.block={mcfg.block!r} is not registered in "
                              "recursive_lm.analysis.accounting.ACTIVE_MATMUL_PARAMS")
  active = ACTIVE_MATMUL_PARAMS[mcfg.block]
  model = model if model is not None else abstract_model(mcfg)
  n = mcfg.d_model * mcfg.vocab_size
  for i, (spec, stage) in enumerate(zip(model.plan.stages, model.stages)):
    n += spec.repeats * active(stage.blocks, mcfg)
    if stage.slots is not None:
      n += _dense_matmul_params(stage.slots, mcfg)
    if stage.shared_kv:
      n += _shared_kv_params(model.plan.stage_layers(i), stage)
  if model.injection is not None:  # recurrent plans: the input injection runs once per core iteration
    n += model.plan.stages[1].repeats * _dense_matmul_params(model.injection, mcfg)
  return n


def _shared_kv_params(layers, stage) -> int:
  """Per-token K/V weights of a stage under model.kv_sharing: the K/V
  projections (stored [W, ...] for the W writing blocks) run once per layer
  that writes, and so do the K/V adapters (stored [Wd, ...], one per writing
  layer). The layers that only read K/V store and run neither."""
  writes = sum(l.kv_write for l in layers)
  n = _sum(nnx.state(stage.kv)) // len(stage.kv_blocks) * writes if stage.kv is not None else 0
  if stage.kv_lora is not None:
    n += _sum(nnx.state(stage.kv_lora))
  return n


def kv_cache_bytes_per_token(cfg: Config | ModelConfig, model: Transformer | None = None) -> int:
  """Bytes the KV cache holds per token of context: one K and one V of
  [Kv, Hd] in the compute dtype per distinct KV slot (`plan.kv_slots`)."""
  import numpy as np
  mcfg = _model_cfg(cfg)
  model = model if model is not None else abstract_model(mcfg)
  return model.plan.kv_slots * 2 * mcfg.num_kv_heads * mcfg.head_dim * np.dtype(mcfg.compute_dtype).itemsize


def flops_per_token(cfg: Config | ModelConfig, seq_len: int, model: Transformer | None = None) -> int:
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
  """
  mcfg = _model_cfg(cfg)
  model = model if model is not None else abstract_model(mcfg)
  attn = 6 * model.plan.depth * seq_len * mcfg.num_heads * mcfg.head_dim
  return 6 * matmul_params_per_token(mcfg, model) + attn


def describe(cfg: Config) -> dict:
  """Summary of a config's model: parameter counts, depth plan, FLOPs/token.

  Keys: unique_params, untied_params, lora_params, total_params,
  embedding_params, effective_depth, unique_blocks, flops_per_token (training,
  at seq_len; None for a block type not in ACTIVE_MATMUL_PARAMS), seq_len, kv_sharing, kv_slots (distinct
  KV-cache entries), kv_cache_bytes_per_token, plan (list of {depth, stage, block, repeat, kv_slot}).
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
  }
