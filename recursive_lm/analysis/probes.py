"""Probes of a trained recursive model, depth by depth.

  hidden_states(run, tokens)      residual stream after each effective layer [L_eff+1, B, T, D]
  depth_losses(run)               logit lens: eval loss if the model stopped after each layer [L_eff]
  cosine_similarity / linear_cka / similarity(hidden)   depth x depth matrices [L_eff+1, L_eff+1]
  lora_spectra(run)               per-depth LoRA deltas: Frobenius norms and singular values
  moe_usage(run)                  expert usage per layer and per repeat (MoEUT blocks)
  router_depths(run, routing=)    recursions each token takes in a Mixture-of-Recursions model

Depth 0 is the embedding output; depth l >= 1 is the residual stream after
effective layer l - 1 (`plan.layers()[l - 1]`). Every function takes a `Run`
(from `load_run`) or, where no data is needed, a bare model.

The model exposes only its final output, so `hidden_states` walks the plan's
layer records through `recursion.apply_layer`, the per-layer entry point the
unrolled reference runs too. The tests check that this walk reproduces the
model's logits and its per-depth `resid_rms`.
"""

from __future__ import annotations

import dataclasses
import functools
import string

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recursive_lm.model import recurrent, walk



def _model(run_or_model):
  return getattr(run_or_model, "model", run_or_model)


# ----------------------------------------------------------------------------
# The residual stream, layer by layer.


def residual_stream(model, tokens: jax.Array) -> tuple[jax.Array, dict]:
  """Traceable: tokens int [B, T] -> (hidden [L_eff+1, B, T, D] in the compute
  dtype, aux {name: [L_eff, ...]}) with hidden[0] the embedding output and
  hidden[l] the residual stream after effective layer l - 1. A recurrent
  plan's core layers see the injection as the model runs it (plan repeats)."""
  if model.routed is not None:  # a per-layer walk would run every token through every recursion
    raise ValueError(f"model.mor.routing={model.cfg.mor.routing!r}: the layer-by-layer probes do not apply the "
                     "routers; use analysis.router_depths for a routed model")
  ctx, _ = model.context(tokens.shape[1])
  x = model.embed(tokens, jnp.dtype(model.cfg.compute_dtype))
  hidden = [x]
  inject = recurrent.loop_start(model, ctx) if model.recurrent else model.loop_start
  hooks = walk.Hooks(loop_start=inject, layer_end=lambda x, layer: hidden.append(x))
  _, _, aux, _ = walk.walk(model, model.plan.layers(), x, ctx, None, hooks=hooks)
  return jnp.stack(hidden), aux


def readout(model, h: jax.Array) -> jax.Array:
  """The model's output head on any residual stream: h [..., T, D] -> logits [..., T, V] float32."""
  return model.readout(h)


# Jitted with the graphdef static, so repeated calls on one model compile once
# per batch shape (the graphdef is hashable and equal across nnx.split calls).
@functools.partial(jax.jit, static_argnums=0)
def _hidden(graphdef, state, tokens):
  hidden, _ = residual_stream(nnx.merge(graphdef, state), tokens)
  return hidden.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _depth_loss_sums(graphdef, state, inputs, targets):
  """-> [L_eff+1] float32 sums of token cross-entropy after each depth."""
  model = nnx.merge(graphdef, state)
  hidden, _ = residual_stream(model, inputs)
  # One depth at a time: [B, T, V] logits for L+1 depths at once would be L+1 times the memory.
  sums = [optax.softmax_cross_entropy_with_integer_labels(readout(model, h), targets).sum() for h in hidden]
  return jnp.stack(sums)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward_aux(graphdef, state, tokens, routing=None):
  _, _, aux = nnx.merge(graphdef, state)(tokens, routing=routing)
  return aux


def hidden_states(run_or_model, tokens=None) -> np.ndarray:
  """Residual stream at every depth: float32 [L_eff+1, B, T, D].

  tokens: int [B, T]; default (with a Run) the inputs of the first eval batch.
  """
  model = _model(run_or_model)
  if tokens is None:
    tokens = run_or_model.eval_batches(1)[0]["inputs"]
  graphdef, state = nnx.split(model)
  return np.asarray(_hidden(graphdef, state, jnp.asarray(tokens, jnp.int32)))


def depth_losses(run, n_batches: int | None = None, include_embedding: bool = False,
                 batches: list[dict] | None = None) -> np.ndarray:
  """Logit lens across loops: mean token cross-entropy (nats) if the model
  stopped after each effective layer and went straight to the final norm and
  head, over the first `n_batches` eval batches (default: the run's
  train.eval_batches, i.e. the batches its eval loss was measured on).

  Returns [L_eff] (entry l: after effective layer l; the last entry is the
  model's own eval loss), or [L_eff+1] with the embedding-only readout first
  when include_embedding. `batches` overrides the eval batches.
  """
  model = _model(run)  # a bare model works too when `batches` is given
  batches = run.eval_batches(n_batches) if batches is None else batches
  graphdef, state = nnx.split(model)
  # Per-batch float32 sums added in Python, as the run's own evaluation does,
  # so the last depth reproduces its eval loss to float32 rounding.
  total, count = np.zeros(model.plan.depth + 1), 0
  for batch in batches:
    sums = _depth_loss_sums(graphdef, state, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]))
    total += np.asarray(sums, np.float64)
    count += int(np.size(batch["targets"]))
  losses = total / count
  return losses if include_embedding else losses[1:]


# ----------------------------------------------------------------------------
# Representation similarity between depths.


def _tokens_by_depth(hidden, max_tokens: int | None) -> np.ndarray:
  """hidden [L, ..., D] -> float64 [L, N, D]; N evenly strided down to max_tokens."""
  h = np.asarray(hidden, np.float64)
  h = h.reshape(h.shape[0], -1, h.shape[-1])
  if max_tokens is not None and h.shape[1] > max_tokens:
    h = h[:, np.linspace(0, h.shape[1] - 1, max_tokens).astype(np.int64)]
  return h


def cosine_similarity(hidden, max_tokens: int | None = None) -> np.ndarray:
  """[L, ..., D] -> [L, L]: entry (i, j) is the mean over tokens of the cosine
  between token n's vector at depth i and at depth j (the same token, so this
  asks how much a layer rotates the residual stream)."""
  h = _tokens_by_depth(hidden, max_tokens)
  h = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
  return np.einsum("ind,jnd->ij", h, h) / h.shape[1]


def linear_cka(hidden, max_tokens: int | None = 8192) -> np.ndarray:
  """[L, ..., D] -> [L, L] linear CKA (Kornblith et al. 2019) between depths.

  With X_i the token-centred [N, D] representation at depth i,
  CKA(i, j) = ||X_i^T X_j||_F^2 / (||X_i^T X_i||_F ||X_j^T X_j||_F): 1 for
  representations equal up to rotation and isotropic scaling, invariant to
  both. Computed in feature space (D x D blocks of one Gram matrix), so the
  cost is linear in N; N is strided down to max_tokens (None: all).
  """
  h = _tokens_by_depth(hidden, max_tokens)
  h = h - h.mean(axis=1, keepdims=True)
  n_depth, _, d = h.shape
  z = h.transpose(1, 0, 2).reshape(h.shape[1], n_depth * d)  # [N, L*D]: every depth side by side
  gram = (z.T @ z).reshape(n_depth, d, n_depth, d)  # block (i, j) = X_i^T X_j
  hsic = np.einsum("idje,idje->ij", gram, gram)
  diag = np.sqrt(np.diag(hsic))
  return hsic / np.maximum(np.outer(diag, diag), 1e-300)


def similarity(hidden, max_tokens: int | None = 8192) -> dict[str, np.ndarray]:
  """{'cosine': [L, L], 'cka': [L, L]} of hidden [L, ..., D] (see the two functions)."""
  return {"cosine": cosine_similarity(hidden, max_tokens), "cka": linear_cka(hidden, max_tokens)}


# ----------------------------------------------------------------------------
# LoRA deltas.

_SHARED_KERNEL = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}


def _shared_kernel(blocks, target: str):
  """The stacked shared kernel [U, d_in, d_out] a LoRA target adapts, or None
  for block types that store it another way."""
  try:
    return np.asarray(getattr(getattr(blocks, _SHARED_KERNEL[target]), target).kernel[...], np.float64)
  except (AttributeError, KeyError):
    return None


def lora_delta(lora) -> np.ndarray:
  """A (stacked) LoRA module -> float64 delta = scale * A @ B: [..., d_in, d_out]."""
  a = np.asarray(lora.a[...], np.float64)
  b = np.asarray(lora.b[...], np.float64)
  return lora.scale * (a @ b)


def lora_spectra(run_or_model) -> dict[str, dict]:
  """Per-depth LoRA deltas of every stage with slots, per target module.

  Keys '<stage>/<target>' (e.g. 'main/q'); each value has, for the S = U*C
  slots of the stage in effective-layer order (under KV sharing, the k and v
  adapters exist only at the S layers that write K/V):
    stage, target, rank, scale
    depths          [S] effective-layer index of each slot
    blocks, repeats [S] unique block and repeat of each slot
    norm            [S] ||scale * A_s @ B_s||_F
    relative_norm   [S] norm / ||W_block||_F of the shared kernel it adapts (None if not found)
    singular_values [S, min(d_in, d_out)] descending; at most `rank` are nonzero
    stable_rank     [S] ||delta||_F^2 / sigma_max^2 (how many directions the update really uses)
  An empty dict for a model without LoRA.
  """
  model = _model(run_or_model)
  out, offset = {}, 0
  for spec, stage in zip(model.plan.stages, model.stages):
    # Under KV sharing the K/V adapters are stored only for the depths that write K/V (`kv_depths`).
    groups = [(stage.slots, tuple(range(spec.depth))), (stage.kv_lora, stage.kv_depths)]
    items = [(t, lora, slots) for mods, slots in groups if mods is not None for t, lora in mods.lora.items()]
    for target, lora, slots in sorted(items, key=lambda item: item[0]):
      blocks_of = np.array([spec.block_and_repeat(s)[0] for s in slots], dtype=int)
      repeats_of = np.array([spec.block_and_repeat(s)[1] for s in slots], dtype=int)
      delta = lora_delta(lora)  # [S, d_in, d_out]
      norm = np.linalg.norm(delta, axis=(-2, -1))
      sv = np.linalg.svd(delta, compute_uv=False)
      kernel, rows = _shared_kernel(stage.blocks, target), blocks_of
      if kernel is None and stage.kv is not None and target in ("k", "v"):  # KV sharing: the writers' projections
        kernel = np.asarray(getattr(stage.kv, target).kernel[...], np.float64)  # [W, d_in, d_out]
        rows = np.array([stage.kv_blocks.index(b) for b in blocks_of], dtype=int)
      rel = None if kernel is None else norm / np.linalg.norm(kernel, axis=(-2, -1))[rows]
      out[f"{spec.name}/{target}"] = {
          "stage": spec.name, "target": target, "rank": int(lora.a.shape[-1]), "scale": float(lora.scale),
          "depths": offset + np.array(slots, dtype=int), "blocks": blocks_of, "repeats": repeats_of,
          "norm": norm, "relative_norm": rel, "singular_values": sv,
          "stable_rank": np.where(sv[:, 0] > 0, norm**2 / np.maximum(sv[:, 0], 1e-300) ** 2, 0.0),
      }
    offset += spec.depth
  return out


# ----------------------------------------------------------------------------
# MoE expert usage.


@dataclasses.dataclass
class MoEUsage:
  """Expert usage of a MoEUT model on some batches; falsy (with `message`) for dense models.

  usage:    {aux key: [L_eff, ..., E]} mean over batches of the share of
            tokens that selected each expert ('mlp_usage' [L_eff, E] sums to
            top_k per layer; 'att_v_usage' / 'att_o_usage' [L_eff, H, Ea])
  by_block: {'<stage>/b<k>': {aux key: [C, ..., E]}} the same per unique
            block, one row per repeat (how one shared layer's routing changes
            across loops)
  dead:     {aux key: [L_eff]} experts no token selected at that layer
  entropy:  {aux key: [L_eff]} entropy of usage / top_k normalised by log E
            (1: perfectly even; averaged over heads for attention)
  layers:   plan.describe()
  """

  available: bool
  message: str
  usage: dict = dataclasses.field(default_factory=dict)
  by_block: dict = dataclasses.field(default_factory=dict)
  dead: dict = dataclasses.field(default_factory=dict)
  entropy: dict = dataclasses.field(default_factory=dict)
  layers: list = dataclasses.field(default_factory=list)

  def __bool__(self) -> bool:
    return self.available


USAGE_KEYS = ("mlp_usage", "att_v_usage", "att_o_usage")


def moe_usage(run, n_batches: int | None = None) -> MoEUsage:
  """Expert usage per effective layer and per repeat from the model's own aux
  (its scanned forward), on the first n eval batches (default: the run's
  train.eval_batches). Dense models give MoEUsage(available=False, message)."""
  cfg, model = run.cfg, run.model
  if cfg.model.block != "moeut":
    return MoEUsage(False, f"model.block={cfg.model.block!r}: a dense model has no experts, so no usage to show "
                           "(train e.g. configs/moeut.py for MoE routing statistics)")
  graphdef, state = nnx.split(model)
  sums, batches = {}, run.eval_batches(n_batches)
  for batch in batches:
    aux = _forward_aux(graphdef, state, jnp.asarray(batch["inputs"]))
    for key in USAGE_KEYS:
      if key in aux:
        sums[key] = sums.get(key, 0.0) + np.asarray(aux[key], np.float64)
  usage = {k: v / len(batches) for k, v in sums.items()}
  if not usage:
    return MoEUsage(False, "the model's aux has no expert usage (no MoE layer with more than one expert)")
  layers = model.plan.layers()
  by_block: dict[str, dict] = {}
  for key, u in usage.items():
    for l in layers:
      spec = model.plan.stages[l.stage]
      name = f"{spec.name}/b{l.block}"
      rows = by_block.setdefault(name, {}).setdefault(key, np.zeros((spec.repeats,) + u.shape[1:]))
      rows[l.repeat] = u[l.depth]
  top_k = {"mlp_usage": cfg.model.moe.top_k}
  dead, entropy = {}, {}
  for key, u in usage.items():
    e = u.shape[-1]
    k = top_k.get(key, min(cfg.model.moe.att_top_k, e))
    p = u / k  # usage sums to the number of experts each token picks
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1) / np.log(e)
    entropy[key] = h.reshape(h.shape[0], -1).mean(axis=1)
    dead[key] = (u == 0).reshape(u.shape[0], -1).sum(axis=1)
  return MoEUsage(True, f"expert usage of {len(usage)} router kind(s) over {len(batches)} eval batches",
                  usage, by_block, dead, entropy, model.plan.describe())


ROUTINGS = ("topk", "threshold")
BYTE_CLASSES = ("letters", "digits", "whitespace", "punctuation", "other")


def byte_classes(ids) -> np.ndarray:
  """Byte ids [...] (0..255) -> int8 [...] index into BYTE_CLASSES: ASCII
  letters, digits, whitespace (space \\t \\n \\r \\v \\f), ASCII punctuation
  (string.punctuation, '_' included), other (control bytes and bytes >= 128,
  i.e. the pieces of non-ASCII characters)."""
  table = np.full(256, len(BYTE_CLASSES) - 1, np.int8)
  for k, chars in enumerate((string.ascii_letters, string.digits, string.whitespace, string.punctuation)):
    table[[ord(c) for c in chars]] = k
  return table[np.asarray(ids)]


@dataclasses.dataclass
class RouterDepths:
  """Which tokens go deep in a Mixture-of-Recursions model (`router_depths`).

  depth [N, T] int: recursions each token of the N sequences took; tokens
  [N, T] int: the token ids; depth_frac [R + 1]: share of tokens per depth
  0..R; by_position [T]: mean depth per position; by_token {id: (mean depth,
  count)} over the token ids seen; by_class {BYTE_CLASSES name: (mean depth,
  count)} for a byte-level tokenizer (empty otherwise; classes no token fell
  in are left out); routing: 'topk' or 'threshold' (see `router_depths`).
  available False (with a message) for a model without routers."""
  available: bool
  message: str
  depth: np.ndarray | None = None
  tokens: np.ndarray | None = None
  depth_frac: np.ndarray | None = None
  by_position: np.ndarray | None = None
  by_token: dict = dataclasses.field(default_factory=dict)
  by_class: dict = dataclasses.field(default_factory=dict)
  routing: str = "topk"

  def __bool__(self) -> bool:
    return self.available


def _mean_by(depth: np.ndarray, keys: np.ndarray) -> dict:
  """{key: (mean depth, count)} over the distinct values of keys (same shape as depth)."""
  return {int(k): (float(depth[keys == k].mean()), int((keys == k).sum())) for k in np.unique(keys)}


def depth_summary(depth: np.ndarray, tokens: np.ndarray, repeats: int, byte_level: bool = False,
                  routing: str = "topk") -> RouterDepths:
  """RouterDepths of per-token depths [N, T] and token ids [N, T]; by_class
  when the ids are bytes (byte_level)."""
  depth, tokens = np.asarray(depth), np.asarray(tokens)
  by_class = {}
  if byte_level:
    by_class = {BYTE_CLASSES[k]: v for k, v in _mean_by(depth, byte_classes(tokens)).items()}
  rule = "training's: top-k over each sequence" if routing == "topk" else "generation's: each token alone, causal"
  return RouterDepths(True, f"router depths of {depth.size} tokens ({depth.shape[0]} sequences), routing "
                            f"{routing!r} ({rule})", depth, tokens,
                      np.bincount(depth.ravel(), minlength=repeats + 1) / depth.size, depth.mean(0),
                      _mean_by(depth, tokens), by_class, routing)


def router_depths(run, n_batches: int | None = None, routing: str = "topk") -> RouterDepths:
  """Per-token recursion depths the routers choose on the first n eval batches
  (default: the run's train.eval_batches), from the model's own forward (its
  'router_depth' aux).

  routing: 'topk' routes as training does (each step keeps the top
  capacity_r share of each sequence: not causal, so a token's depth depends
  on the tokens after it); 'threshold' as generation does (each token decides
  alone from its own residual stream: expert routing continues while
  sigmoid(router) >= 0.5, token routing takes its argmax depth), the depths
  KV-cache decoding of the same tokens takes. A model without routers gives
  RouterDepths(available=False, message). `run`: a Run, or anything with cfg,
  model and eval_batches(n).
  """
  if routing not in ROUTINGS:
    raise ValueError(f"routing={routing!r}: one of {list(ROUTINGS)} (training's top-k over the sequence, or "
                     "generation's per-token threshold)")
  cfg, model = run.cfg, run.model
  if cfg.model.mor.routing == "none":
    return RouterDepths(False, "model.mor.routing='none': no routers, every token takes every recursion "
                               "(train e.g. configs/mor.py for per-token depths)", routing=routing)
  graphdef, state = nnx.split(model)
  batches = run.eval_batches(n_batches)
  depth = [np.asarray(_forward_aux(graphdef, state, jnp.asarray(b["inputs"]), routing)["router_depth"])
           for b in batches]
  tokens = [np.asarray(b["inputs"]) for b in batches]
  return depth_summary(np.concatenate(depth), np.concatenate(tokens), model.plan.stages[model.routed].repeats,
                       bool(getattr(run, "is_byte_level", False)), routing)


__all__ = ["BYTE_CLASSES", "MoEUsage", "RouterDepths", "byte_classes", "cosine_similarity", "depth_losses",
           "depth_summary", "hidden_states", "linear_cka", "lora_delta", "lora_spectra", "moe_usage", "readout",
           "residual_stream", "router_depths", "similarity"]
