"""The MoEUT block: SwitchHead attention and a sigma-MoE feed-forward with
peri-layernorm (Csordas et al. 2024).

  norm_style 'peri' (the paper):   a = N1(x)
      x = x + SwitchHead(q, k, routers <- a;  V experts <- x)
      x = x + SigmaMoE(router <- N2(x);  experts <- x)
  norm_style 'pre' (the ablation): every projection reads the normalised input.

No norm on the block output: the residual stream is normalised only by the
final norm before the head (already in `Transformer`). Sharing across depth
is the depth plan's business: MoEUT's G unique layers repeated L/G times in
A-B-A-B order is the `cycle` preset with repeats = L / G.

Init: every weight of the block is scaled by sqrt(2 / L_eff), L_eff the
effective depth (the authors' `reset_parameters` passes this scale to
attention and MoE alike: Q, K, V, routers at s / sqrt(D), O at s / sqrt(H Hd),
expert values at s / sqrt(E S)); router vectors are renormalised to equal
norms; norms start at scale 1, bias 0.

The per-depth slot may carry LoRA adapters for q and k only (config load
rejects other targets) and, with per-depth norms, the two norms.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from recursive_lm.config import ModelConfig
from recursive_lm.model.attention import Context
from recursive_lm.model.block import DepthSlot
from recursive_lm.model.layers import Norm
from recursive_lm.model.moe import SigmaMoE
from recursive_lm.model.switchhead import SwitchHead


def _norm(cfg: ModelConfig) -> Norm:
  return Norm(cfg.d_model, cfg.norm, cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))


class MoEUTBlock(nnx.Module):
  """Same constructor and call contract as `recursive_lm.model.block.Block`."""

  def __init__(self, cfg: ModelConfig, own_norms: bool, total_depth: int, rngs: nnx.Rngs):
    m = cfg.moe
    scale = (2.0 / total_depth) ** 0.5
    self.peri = m.norm_style == "peri"
    self.attn_norm = _norm(cfg) if own_norms else None
    self.attn = SwitchHead(cfg, scale, rngs)
    self.mlp_norm = _norm(cfg) if own_norms else None
    self.mlp = SigmaMoE(cfg.d_model, m.experts, m.expert_size, m.top_k, scale, rngs, jnp.dtype(cfg.param_dtype),
                        m.dispatch, m.block_rows)

  def __call__(self, x: jax.Array, slot: DepthSlot | None, ctx: Context, cache: dict | None):
    """x [B, T, D] -> (x, cache, aux): aux has 'resid_rms' (scalar) and the router statistics
    of SwitchHead ('att_*') and SigmaMoE ('mlp_*') that `moe.balance_loss` reads."""
    lora = {} if slot is None else dict(slot.lora)
    attn_norm = self.attn_norm if self.attn_norm is not None else slot.attn_norm
    mlp_norm = self.mlp_norm if self.mlp_norm is not None else slot.mlp_norm
    a = attn_norm(x)
    h, cache, att_aux = self.attn(a, x if self.peri else a, ctx, lora, cache)
    x = x + h
    m = mlp_norm(x)
    y, mlp_aux = self.mlp(x if self.peri else m, m)
    x = x + y
    rms = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))
    return x, cache, {"resid_rms": rms, **att_aux, **mlp_aux}


def active_matmul_params(blocks: MoEUTBlock, cfg: ModelConfig) -> int:
  """Weights one token multiplies with in a (stacked) MoEUT block: Q, K and
  every router in full, V/O experts at att_top_k / att_experts and the MLP
  experts at top_k / experts; norms excluded. The `moeut` entry of
  `recursive_lm.analysis.accounting.ACTIVE_MATMUL_PARAMS`."""
  m = cfg.moe
  size = lambda v: int(math.prod(v.shape))
  att, mlp = blocks.attn, blocks.mlp
  n = size(att.q.kernel) + size(att.k.kernel) + size(att.sel_o) + (0 if att.sel_v is None else size(att.sel_v))
  n += (size(att.v) + size(att.o)) * min(m.att_top_k, m.att_experts) / m.att_experts
  n += size(mlp.router) + (size(mlp.keys) + size(mlp.values)) * m.top_k / m.experts
  return int(round(n))
