"""Optimiser: AdamW with a warmup schedule, global-norm clipping and
weight-decay masks, all from optax. Gradient accumulation is not an optimiser
wrapper: the train step sums the micro-batch gradients and makes one update
per step (see train_step.py), so every optimiser count is a real step.

Weight decay applies to ordinary weights only: norm scales/biases never, LoRA
factors only with `optim.decay_lora` (decaying B pulls the relaxed model back
toward the tied one, which is sometimes what a study wants).
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from recursive_lm.config import OptimConfig
from recursive_lm.model.layers import LoRAParam, NormParam


def schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
  """Learning rate per optimiser step: linear warmup, then cosine / WSD / constant."""
  warm = min(cfg.warmup_steps, steps)
  final = cfg.lr * cfg.final_lr_fraction
  rest = max(steps - warm, 1)
  if cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.final_lr_fraction)
  elif cfg.schedule == "wsd":
    decay = max(int(round(rest * cfg.decay_fraction)), 1)
    after = optax.join_schedules(
        [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, final, decay)], [rest - decay])
  else:
    after = optax.constant_schedule(cfg.lr)
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm])


def decay_mask(params: nnx.State, decay_lora: bool):
  """Pytree of bools matching `params`: True where weight decay applies."""

  def decays(var):
    if isinstance(var, NormParam):
      return False
    if isinstance(var, LoRAParam):
      return decay_lora
    return var.ndim >= 2

  return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make(cfg: OptimConfig, steps: int, params: nnx.State, skip_nonfinite: bool = False):
  """(optax transformation for `steps` optimiser steps over `params` (an nnx.State of Params), its schedule).

  The learning rate is injected (optax.inject_hyperparams), so the optimiser
  state holds the rate of the last update it applied: `learning_rate(state)`.
  """
  lr = schedule(cfg, steps)
  mask = decay_mask(params, cfg.decay_lora)  # a prefix of both the Variable and the pure-array trees
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps", "weight_decay", "mask"))
  parts.append(adamw(learning_rate=lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask))
  tx = optax.chain(*parts)
  if skip_nonfinite:
    # A skipped update leaves the inner state, and so the schedule's count, where it was.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
  return tx, lr


def learning_rate(opt_state) -> jax.Array:
  """The learning rate of the last update applied (schedule(0) before the first)
  from the state of a `make` transformation (pure arrays or nnx Variables)."""
  # The injected value, not the schedule's own state under the same key.
  return optax.tree.get(nnx.as_pure(opt_state), "learning_rate", filtering=lambda _, v: isinstance(v, jax.Array))
