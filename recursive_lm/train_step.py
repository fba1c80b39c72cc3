"""The pure, jitted train and eval steps.

State is `nnx.state((model, optimizer))`; the step merges it with a fixed
graphdef, so the jitted function is `(state, batch) -> (state, metrics)` with
explicit shardings and the state donated. A step is one optimiser update on
one whole batch, accumulated over micro-batches when optim.grad_accum > 1.
Every step returns diagnostics: loss, grad / param / update norms, learning
rate, a finiteness flag and the per-depth statistics the blocks report
(`depth/<name>`, one value per effective layer).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from recursive_lm import axes, optim, sharding
from recursive_lm.model.recursion import row_stats
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


def loss_fn(params: nnx.State, graphdef, rest: nnx.State, batch: dict, n_targets: jax.Array, n_micro: int,
            recurrent: dict | None = None, exit_weights: tuple[float, ...] = ()):
  """The training objective of one micro-batch, scaled so that the k micro-batch
  objectives of a step sum to the objective of the whole batch:

    sum of its token losses / n_targets + regulariser / n_micro

  n_targets counts the valid targets of the whole batch, so the summed
  cross-entropy is the whole batch's masked mean (micro-batches with more valid
  targets weigh more, as their tokens do in the unsplit batch). The MoE
  regulariser is a mean over sequences, so the mean over equal micro-batches
  is the whole batch's value. recurrent: the step's {'loops', 'key'}
  (`recursive_lm.model.recurrent.draw`) for a recurrent plan, else None.

  exit_weights (train.exit_loss_weights): w_1 .. w_N, one per loop of the
  repeated stage (N = loop boundaries + 1). The cross-entropy part is then
  sum_j w_j * CE_j, where CE_j (j < N) reads out the residual stream after
  loop j through the shared final norm and head (as the exits do) and CE_N
  is the model's own output; (0, ..., 0, 1) is the plain objective.
  Returns (objective, (the output's cross-entropy CE_N, aux, regulariser
  metrics, {'loss_loop_j': CE_j} or {}))."""
  model: Transformer = nnx.merge(graphdef, params, rest)
  run = {} if recurrent is None else dict(loops=recurrent["loops"], key=jax.random.wrap_key_data(recurrent["key"]))
  if exit_weights:
    run["loop_states"] = True
  logits, _, aux = model(batch["inputs"], **run)
  losses, _ = token_losses(logits.astype(jnp.float32), batch["targets"])
  ce = losses.sum() / n_targets
  objective, loop_losses = ce, {}
  if exit_weights:
    states = aux.pop("loop_states")  # [N - 1, B, T, D]
    loop_ces = [token_losses(model.readout(states[j]), batch["targets"])[0].sum() / n_targets
                for j in range(states.shape[0])] + [ce]
    objective = sum(w * l for w, l in zip(exit_weights, loop_ces))
    loop_losses = {f"loss_loop_{j + 1}": l for j, l in enumerate(loop_ces)}
  reg, reg_metrics = model.regulariser(aux)
  return objective + reg / n_micro, (ce, aux, reg_metrics, loop_losses)


def _norm(tree) -> jax.Array:
  return optax.tree.norm(tree)


def split_micro(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...]: micro-batch j holds rows j, j + k, j + 2k, ...

  Strided rather than contiguous because the rows are split over the
  data-parallel devices in contiguous blocks: each device's block then holds
  B/(k * dp) rows of every micro-batch, so the split moves no data (needs
  B/k divisible by dp, see sharding.check_batch)."""
  x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
  return sharding.constrain(x, (None, axes.BATCH) + (None,) * (x.ndim - 2))


def make_train_step(graphdef, state_shardings=None, batch_sharding=None, *, grad_accum: int = 1,
                    recurrent: bool = False, exit_weights: tuple[float, ...] = ()) -> Callable:
  """Jitted `(state, batch) -> (state, metrics)`; `state` is donated.

  recurrent=True (recurrent plans): `(state, batch, draw) -> (state, metrics)`
  where draw is the step's {'loops': int32 [] or one per row [B], 'key': uint32 [2]}
  (`recursive_lm.model.recurrent.draw`): traced, so every loop count runs the
  same compiled step; metrics then include `loops` (the mean over rows).

  batch: {'inputs', 'targets'} int [B, T], the whole batch of one optimiser
  step. With grad_accum = k > 1 it is split into k micro-batches of B/k rows
  (`split_micro`) whose gradients a `lax.scan` sums (only one micro-batch's
  activations are alive at a time); then one optimiser update. The weighting
  (`loss_fn`) makes this the gradient of the unsplit batch, up to float
  rounding. Metrics: loss (cross-entropy of the whole batch), total_loss,
  grad_norm (of the summed gradient), param_norm, update_norm (of the one
  update), learning_rate (of that update, from the optimiser state),
  finite, the regulariser's metrics (means over the micro-batches: exact for
  the balance loss and expert shares; `moe/*_dead` then counts experts unused
  in a micro-batch, on average) and `depth/<name>` [L_eff] (see `row_stats`).
  exit_weights: per-loop readout losses (`loss_fn`); metrics then include
  `loss_loop_1` .. `loss_loop_N` (the last equals `loss`).
  """
  k = grad_accum

  def step(state, batch, recurrent=None):
    model, opt = nnx.merge(graphdef, state)
    m_def, params, rest = nnx.split(model, nnx.Param, ...)
    n_targets = jnp.maximum((batch["targets"] >= 0).sum(), 1).astype(jnp.float32)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
      (loss, (ce, aux, reg_metrics, loop_losses)), grads = grad_fn(params, m_def, rest, batch, n_targets, 1,
                                                                   recurrent, exit_weights)
    else:
      # Per-row loop counts [B] are split with their rows; the key (or one count for the batch) goes to each.
      per_row = recurrent is not None and recurrent["loops"].ndim == 1

      def micro_step(acc, xs):
        micro, loops = xs
        rec = recurrent if loops is None else {**recurrent, "loops": loops}
        (obj, (ce, aux, reg_metrics, loop_losses)), g = grad_fn(params, m_def, rest, micro, n_targets, k, rec,
                                                                exit_weights)
        aux = {name: v for name, v in aux.items() if v.ndim == 1}  # only the per-depth statistics are reported
        return jax.tree.map(jnp.add, acc, g), (obj, ce, aux, reg_metrics, loop_losses)

      xs = (jax.tree.map(lambda x: split_micro(x, k), batch), split_micro(recurrent["loops"], k) if per_row else None)
      grads, (objs, ces, aux, reg_metrics, loop_losses) = jax.lax.scan(
          micro_step, jax.tree.map(jnp.zeros_like, params), xs)
      loss, ce = objs.sum(), ces.sum()
      loop_losses = jax.tree.map(lambda v: v.sum(0), loop_losses)  # parts of the whole batch's mean, like ce
      aux, reg_metrics = row_stats(aux), jax.tree.map(lambda v: v.mean(0), reg_metrics)
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
        "learning_rate": optim.learning_rate(opt.opt_state),
        "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        **reg_metrics,
        **loop_losses,
        **{f"depth/{name}": v for name, v in aux.items() if v.ndim == 1},
        **({} if recurrent is None else {"loops": jnp.mean(recurrent["loops"].astype(jnp.float32))}),
    }
    return nnx.state((model, opt)), metrics

  ins = (state_shardings, batch_sharding) + ((None,) if recurrent else ())
  shardings = {} if state_shardings is None else dict(in_shardings=ins, out_shardings=(state_shardings, None))
  return jax.jit(step if recurrent else lambda state, batch: step(state, batch), donate_argnums=0, **shardings)


def make_eval_step(graphdef, loops: bool = False) -> Callable:
  """Jitted `(model_state, batch) -> (sum of token losses, token count)`.
  loops=True (recurrent plans): `(model_state, batch, loops)` with the core's
  loop count a traced int32, so one compiled step serves every count."""

  def step(state, batch, loops=None):
    model = nnx.merge(graphdef, state)
    logits, _, _ = model(batch["inputs"], **({} if loops is None else {"loops": loops}))
    losses, valid = token_losses(logits, batch["targets"])
    return losses.sum(), valid.sum().astype(jnp.float32)

  return jax.jit(step if loops else lambda state, batch: step(state, batch))
