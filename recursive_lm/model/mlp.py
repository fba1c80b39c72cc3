"""Feed-forward layers: gated (SwiGLU / GeGLU) and plain (GELU / ReLU) MLPs.

x [B, T, D] -> [B, T, D] through a hidden width F.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recursive_lm import axes
from recursive_lm.config import ModelConfig
from recursive_lm.model import kernels
from recursive_lm.model.layers import Dense, LoRA

ACTIVATIONS = {
    "swiglu": jax.nn.silu,
    "geglu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
GATED = ("swiglu", "geglu")


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, out_std: float, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.mlp_dim
    pd, mm = jnp.dtype(cfg.param_dtype), kernels.dense_kernel(cfg)
    self.act = ACTIVATIONS[cfg.mlp_type]
    self.gate = Dense(d, f, axes.EMBED, axes.MLP, d**-0.5, rngs, pd, mm) if cfg.mlp_type in GATED else None
    self.up = Dense(d, f, axes.EMBED, axes.MLP, d**-0.5, rngs, pd, mm)
    self.down = Dense(f, d, axes.MLP, axes.EMBED, out_std, rngs, pd, mm)

  def __call__(self, x: jax.Array, lora: dict[str, LoRA]) -> jax.Array:
    up = self.up(x, lora.get("up"))
    h = self.act(up) if self.gate is None else self.act(self.gate(x, lora.get("gate"))) * up
    return self.down(h, lora.get("down"))
