"""The pure, jitted train and eval steps.

State is `nnx.state((model, optimizer))`; the step merges it with a fixed
graphdef, so the jitted function is `(state, batch) -> (state, metrics)` with
explicit shardings and the state donated. Every step returns diagnostics:
loss, grad / param / update norms, learning rate, a finiteness flag and the
per-depth statistics the blocks report (`depth/<name>`, one value per
effective layer).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from recursive_lm.model.transformer import Transformer


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean token cross-entropy in float32 over targets >= 0 (negative targets,
  e.g. the non-answer positions of synthetic tasks, are ignored). logits [B, T, V], targets [B, T]."""
  losses, valid = token_losses(logits.astype(jnp.float32), targets)
  return losses.sum() / jnp.maximum(valid.sum(), 1).astype(jnp.float32)


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy [B, T] (0 where targets < 0) and the bool mask of counted targets."""
  valid = targets >= 0
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
  return jnp.where(valid, losses, 0.0), valid


def loss_fn(params: nnx.State, graphdef, rest: nnx.State, batch: dict):
  model: Transformer = nnx.merge(graphdef, params, rest)
  logits, _, aux = model(batch["inputs"])
  ce = cross_entropy(logits, batch["targets"])
  reg, reg_metrics = model.regulariser(aux)
  return ce + reg, (ce, aux, reg_metrics)


def _norm(tree) -> jax.Array:
  return optax.tree.norm(tree)


def make_train_step(graphdef, lr_schedule: Callable, state_shardings=None, batch_sharding=None) -> Callable:
  """Jitted `(state, batch) -> (state, metrics)`; `state` is donated."""

  def step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    m_def, params, rest = nnx.split(model, nnx.Param, ...)
    (loss, (ce, aux, reg_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, m_def, rest, batch)
    count = opt.step[...]
    old_params = nnx.as_pure(params)  # plain arrays: the update rewrites the Variables in place
    opt.update(model, grads)
    new_params = nnx.as_pure(nnx.state(model, nnx.Param))
    grad_norm = _norm(grads)
    metrics = {
        "loss": ce,
        "total_loss": loss,
        "grad_norm": grad_norm,
        "param_norm": _norm(new_params),
        "update_norm": _norm(jax.tree.map(jnp.subtract, new_params, old_params)),
        "learning_rate": lr_schedule(count),
        "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        **reg_metrics,
        **{f"depth/{k}": v for k, v in aux.items() if v.ndim == 1},
    }
    return nnx.state((model, opt)), metrics

  shardings = {} if state_shardings is None else dict(
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None))
  return jax.jit(step, donate_argnums=0, **shardings)


def make_eval_step(graphdef) -> Callable:
  """Jitted `(model_state, batch) -> (sum of token losses, token count)`."""

  def step(state, batch):
    model = nnx.merge(graphdef, state)
    logits, _, _ = model(batch["inputs"])
    losses, valid = token_losses(logits, batch["targets"])
    return losses.sum(), valid.sum().astype(jnp.float32)

  return jax.jit(step)
