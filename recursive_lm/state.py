"""`make_state`: the model and optimiser of a run, built in one place (training,
conversion work directories, benchmarks), so they cannot drift apart."""

from __future__ import annotations

from flax import nnx

from recursive_lm import optim
from recursive_lm.config import Config
from recursive_lm.model.transformer import Transformer


def make_state(cfg: Config, seed: int | None = None):
  """-> (model, optimizer) for cfg: a fresh `Transformer` from
  `seed` (default cfg.seed) and the `optim.make` optimiser over its nnx.Param
  leaves (skipping non-finite updates when train.on_nonfinite='skip').
  Callable inside `sharding.create_sharded` / `abstract_sharded`."""
  model = Transformer(cfg.model, nnx.Rngs(cfg.seed if seed is None else seed))
  tx, _ = optim.make(cfg.optim, cfg.train.steps, nnx.state(model, nnx.Param),
                               skip_nonfinite=cfg.train.on_nonfinite == "skip")
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)
