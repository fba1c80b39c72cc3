"""A pretrained N-layer model -> this package's parameters under any depth plan.

Effective layer l of the converted model plays source layer l: same depth, so
the per-depth layer kinds (sliding window, rotary base) match the source. A
retrofit to prelude / core / coda (`recursive_lm.convert.retrofit`) passes an
explicit map from effective to source layers instead.

Shared blocks (a stage that repeats) are initialised by one rule
(Relaxed Recursive Transformers, Bae et al. 2024); a stage spanning source
depths d0..d1 with K unique blocks, block k used at depths G_k:

  stepwise  source layer round(linspace(d0, d1, K))[k] (numpy rounding, half to
            even): keeps the stage's first and last layer; d0, d1 = 0, N-1 for
            cycle/sequence and 1, N-2 for the middle variants
  average   the mean of the source layers at depths G_k
  lower     source layer d0 + k (the stage's first K layers)
  upper     source layer d1 - K + 1 + k (its last K layers)
  random    the model's own random initialisation

A stage run once (vanilla; the first and last layer of the middle variants)
copies its layer exactly. Norms: with per-depth norms every effective layer
copies its source layer's norms exactly; shared norms follow the block rule.

Depth-wise LoRA (model.lora): effective layer l with block k gets, per target
with rank r, the truncated SVD of its residual R_l = W_l - W_k (kernels
[d_in, d_out], so x @ W_l = x @ W_k + x @ R_l): U S V^T = svd(R_l),
A = U_r, B = S_r V_r^T / s (= A^T R_l / s), where s = alpha / r is the adapter's scale, so
s * A @ B is the best rank-r approximation of R_l. At full rank it is R_l and
the converted model reproduces the source's logits; rank 0 is the strictly
tied model.
"""

from __future__ import annotations

import numpy as np

from recursive_lm.config import ConfigError, ModelConfig
from recursive_lm.convert import retrofit
from recursive_lm.convert.readers import KERNELS, NORMS, Source
from recursive_lm import plan as plan_lib
from recursive_lm.model.block import lora_shapes

INITS = ("stepwise", "average", "lower", "upper", "random")

# Where each per-layer source key lives inside a block's (or slot's) parameters.
PARAM_PATHS = {
    "q": ("attn", "q", "kernel"), "k": ("attn", "k", "kernel"), "v": ("attn", "v", "kernel"),
    "o": ("attn", "o", "kernel"), "gate": ("mlp", "gate", "kernel"), "up": ("mlp", "up", "kernel"),
    "down": ("mlp", "down", "kernel"),
    **{n: (n, "scale") for n in NORMS},
}


def check_depth(source: Source, plan: plan_lib.Plan) -> None:
  if plan.depth != source.num_layers:
    raise ConfigError(f"the plan has {plan.depth} effective layers but the source has {source.num_layers} "
                      "(model.plan.num_layers must equal the source's layer count)")


def source_layers(plan: plan_lib.Plan, n_layers: int, init: str) -> list[list[list[int]]]:
  """Per stage, per unique block: the source layers whose (mean) weights
  initialise it. Stages run once map each block to its own depth."""
  if init not in INITS:
    raise ConfigError(f"--init {init!r} is not one of {list(INITS)}")
  layers = plan.layers()
  if len(layers) != n_layers:
    raise ConfigError(f"the plan has {len(layers)} effective layers but the source has {n_layers}")
  out = []
  for i, spec in enumerate(plan.stages):
    depths = [l.depth for l in layers if l.stage == i]
    groups = [[l.depth for l in layers if l.stage == i and l.block == k] for k in range(spec.unique_blocks)]
    k_n, d0, d1 = spec.unique_blocks, min(depths), max(depths)
    if spec.repeats == 1 or init == "random":
      picked = groups  # exact copies (a stage run once); random: unused for the blocks, kept for reporting
    elif init == "stepwise":
      picked = [[int(x)] for x in np.round(np.linspace(d0, d1, k_n))]
    elif init == "average":
      picked = groups
    elif init == "lower":
      picked = [[d0 + k] for k in range(k_n)]
    else:  # upper
      picked = [[d1 - k_n + 1 + k] for k in range(k_n)]
    out.append(picked)
  return out


def _set(tree: dict, path: tuple, value: np.ndarray) -> None:
  node = tree
  for p in path[:-1]:
    node = node[p]
  if path[-1] not in node:
    raise KeyError(f"no parameter {'/'.join(map(str, path))} in the target model")
  old = node[path[-1]]
  if tuple(old.shape) != tuple(value.shape):
    raise ValueError(f"parameter {'/'.join(map(str, path))}: shape {tuple(value.shape)} from the source, "
                     f"{tuple(old.shape)} in the model")
  node[path[-1]] = np.asarray(value, dtype=np.float32)


def mapped_layers(plan: plan_lib.Plan, lmap: list[int]) -> list[list[list[int]]]:
  """`source_layers` for an explicit layer map (a retrofit: every effective
  layer of a block copies the same source layer, which initialises the block)."""
  layers = plan.layers()
  out = []
  for i, spec in enumerate(plan.stages):
    picked = []
    for k in range(spec.unique_blocks):
      srcs = {lmap[l.depth] for l in layers if l.stage == i and l.block == k}
      assert len(srcs) == 1, f"stage {spec.name} block {k} maps to source layers {sorted(srcs)}"
      picked.append(sorted(srcs))
    out.append(picked)
  return out


def convert_params(source: Source, cfg: ModelConfig, params: dict, init: str = "stepwise",
                   log=lambda s: None, layer_map: list[int] | None = None) -> dict:
  """Fill `params` (nnx.to_pure_dict of the model's nnx.Param state, numpy or
  jax leaves) with the source's weights under cfg's plan; returns the new
  pure dict (numpy float32 leaves). Blocks of repeated stages follow `init`.
  layer_map: per effective layer, the source layer it copies (a retrofit,
  `recursive_lm.convert.retrofit.layer_map`; `init` is then unused); default:
  effective layer l is source layer l."""
  if cfg.kv_sharing != "none":
    raise ConfigError(f"model.kv_sharing={cfg.kv_sharing!r}: a converted model keeps every layer's own K/V "
                      "projections (use model.kv_sharing='none')")
  plan = plan_lib.from_config(cfg)
  if layer_map is None:
    check_depth(source, plan)
  elif len(layer_map) != plan.depth:
    raise ConfigError(f"the layer map has {len(layer_map)} entries but the plan {plan.depth} effective layers")
  lmap = list(range(plan.depth)) if layer_map is None else layer_map
  params = _to_numpy(params)
  _set(params, ("embed", "table"), source.embed)
  _set(params, ("final_norm", "scale"), source.final_norm)
  if source.head is not None or not cfg.tie_embeddings:
    if source.head is None:
      raise ConfigError("the target model has an untied head but the source ties its embeddings")
    _set(params, ("head", "kernel"), source.head)
  if plan.recurrent:  # the first core iteration hands the core the prelude output unchanged
    retrofit.init_injection(cfg.recurrent.injection, params)
  picks = source_layers(plan, source.num_layers, init) if layer_map is None else mapped_layers(plan, lmap)
  shapes = lora_shapes(cfg)
  for i, spec in enumerate(plan.stages):
    stage = params["stages"][i]
    blocks = stage["blocks"]
    slots = stage.get("slots")
    per_depth_norms = slots is not None and any(n in slots for n in NORMS)
    shared = []  # per unique block: {key: weights}
    for k, src in enumerate(picks[i]):
      random = init == "random" and spec.repeats > 1 and layer_map is None
      w = {}
      for key in source.layers[0]:
        if key in NORMS and per_depth_norms:
          continue
        path = PARAM_PATHS[key]
        if random:
          w[key] = _get(blocks, path)[k]
        else:
          w[key] = np.mean([source.layers[j][key] for j in src], axis=0, dtype=np.float64).astype(np.float32)
          _get(blocks, path)[k] = w[key]
      shared.append(w)
    if spec.repeats > 1 and layer_map is None:
      log(f"stage {spec.name}: {spec.unique_blocks} blocks x {spec.repeats} ({spec.order}), init {init}: "
          f"source layers {picks[i] if init != 'random' else 'none (random)'}")
    if slots is None:
      continue
    first = sum(s.depth for s in plan.stages[:i])
    for slot in range(spec.depth):
      depth = first + slot
      k, _ = spec.block_and_repeat(slot)
      layer = source.layers[lmap[depth]]
      if per_depth_norms:
        for key in NORMS:
          if key in layer:
            _get(slots, PARAM_PATHS[key])[slot] = layer[key]
      for target, rank in cfg.lora.ranks:
        residual = layer[target].astype(np.float64) - shared[k][target].astype(np.float64)
        a, b = svd_lora(residual, rank, cfg.lora.scale_of(target))
        assert a.shape == (shapes[target][0], rank), (target, a.shape)
        slots["lora"][target]["a"][slot] = a
        slots["lora"][target]["b"][slot] = b
  return params


def svd_lora(residual: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """A [d_in, r], B [r, d_out] with scale * A @ B the best rank-r approximation of residual [d_in, d_out].

  A holds the top-r left singular vectors (orthonormal) and B = S_r V_r^T / scale
  = A^T residual / scale. They come from the eigendecomposition of the smaller
  Gram matrix (float64), several times faster than a full SVD of a wide matrix;
  at full rank A @ B * scale is the residual itself (A spans its column space).
  """
  r = np.asarray(residual, np.float64)
  d_in, d_out = r.shape
  if d_in <= d_out:
    _, vecs = np.linalg.eigh(r @ r.T)  # ascending eigenvalues = squared singular values
    a = np.ascontiguousarray(vecs[:, ::-1][:, :rank])  # (a reversed view would miss BLAS)
    b = a.T @ r
  else:
    vals, vecs = np.linalg.eigh(r.T @ r)
    v = np.ascontiguousarray(vecs[:, ::-1][:, :rank])
    sv = np.sqrt(np.maximum(vals[::-1][:rank], 0.0))
    keep = sv > sv[:1].max(initial=0.0) * 1e-12  # null directions: r @ v is 0 there, and so is B's row
    a = (r @ v) / np.where(keep, sv, 1.0)
    b = sv[:, None] * v.T
  return a.astype(np.float32), (b / scale).astype(np.float32)


def _get(tree: dict, path: tuple) -> np.ndarray:
  node = tree
  for p in path:
    node = node[p]
  return node


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.array(tree, dtype=np.float32)  # a writable copy


def relative_residuals(source: Source, cfg: ModelConfig, params: dict,
                       layer_map: list[int] | None = None) -> dict[str, float]:
  """||W_l - W_shared - s A B|| / ||W_l|| averaged over depths, per target: how
  much of each layer the tied weights plus its adapter miss (0 at full rank).
  layer_map: as in convert_params (W_l is then source layer layer_map[l])."""
  plan = plan_lib.from_config(cfg)
  lmap = list(range(plan.depth)) if layer_map is None else layer_map
  out = {t: [] for t in KERNELS if t in source.layers[0]}
  for i, spec in enumerate(plan.stages):
    first = sum(s.depth for s in plan.stages[:i])
    stage = params["stages"][i]
    for slot in range(spec.depth):
      k, _ = spec.block_and_repeat(slot)
      layer = source.layers[lmap[first + slot]]
      for t in out:
        w = _get(stage["blocks"], PARAM_PATHS[t])[k].astype(np.float64)
        lora = (stage.get("slots") or {}).get("lora", {}).get(t)
        if lora is not None:
          w = w + cfg.lora.scale_of(t) * lora["a"][slot].astype(np.float64) @ lora["b"][slot].astype(np.float64)
        out[t].append(np.linalg.norm(layer[t] - w) / max(np.linalg.norm(layer[t]), 1e-30))
  return {t: float(np.mean(v)) for t, v in out.items()}


def converted_model(source: Source, cfg: ModelConfig, init: str = "stepwise", log=lambda s: None,
                    layer_map: list[int] | None = None):
  """The converted `Transformer` in memory (one device, no optimiser): shapes
  from nnx.eval_shape, values from the source (the random rule alone builds a
  randomly initialised model first). layer_map: as in convert_params.
  Returns (model, pure params dict)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from recursive_lm.model.transformer import Transformer

  with nnx.use_eager_sharding(False):  # plain single-device arrays: no mesh needed
    if init == "random":
      model = Transformer(cfg, nnx.Rngs(0))
    else:
      model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  start = jax.tree.map(lambda x: np.zeros(x.shape, np.float32) if init != "random" else np.asarray(x),
                       nnx.to_pure_dict(params))
  pure = convert_params(source, cfg, start, init, log, layer_map)
  nnx.replace_by_pure_dict(params, jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(cfg.param_dtype)), pure))
  rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, rest)
  return nnx.merge(graphdef, params, rest), pure
