"""Evaluate a checkpoint on the validation split:
`python -m recursive_lm.evaluate --workdir runs/demo [--step N] [--batches N]`.

Prints one JSON line to stdout:
  {"eval_loss": nats/token, "bits_per_byte": (byte-level tokenizers only),
   "step": checkpoint step, "tokens": tokens evaluated, "batches": N, "workdir": DIR}

The batches are `data.eval_batches(run's data config, N)`, the same fixed list
training evaluates on, so with the run's `train.eval_batches` (the default)
the loss matches the run's eval record at that step. Runs on one device.
Errors (no run directory, config or checkpoint) print one line on stderr and
exit 2.
"""

from __future__ import annotations

import json
import math
import sys

import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx

from recursive_lm import checkpoint, data
from recursive_lm.config import ConfigError
from recursive_lm.inference.decode import load_checkpoint
from recursive_lm.train_step import make_eval_step


def define_flags() -> None:
  """The CLI's flags. Defined only when run as a program, so that `run` and
  `evaluate` can be imported next to other modules' flags (--workdir, --step)."""
  flags.DEFINE_string("workdir", None, "Run directory written by recursive_lm.train.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("batches", None, "Validation batches (default: the run's train.eval_batches).")


def evaluate(model, batches) -> tuple[float, int]:
  """Mean token cross-entropy (nats) of `model` over `batches`, and the token count.

  batches: dicts {'inputs', 'targets'} int32 [B, T]. Sums are accumulated the
  way training's evaluation does (per-batch float32 sums, added in Python).
  """
  step = make_eval_step(nnx.graphdef(model))
  state = nnx.state(model)
  total, count = 0.0, 0.0
  for batch in batches:
    s, n = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    total, count = total + float(s), count + float(n)
  if count == 0:
    raise ConfigError("evaluate: no validation batches (--batches must be > 0)")
  return total / count, int(count)


def run(workdir: str, step: int | None = None, n_batches: int | None = None) -> dict:
  """Load the checkpoint of `workdir` (latest or `step`) and evaluate it. Raises ConfigError."""
  cfg = checkpoint.load_config(workdir)
  n = cfg.train.eval_batches if n_batches is None else n_batches
  if n < 1:
    raise ConfigError(f"--batches={n} must be > 0")
  cfg, model, step = load_checkpoint(workdir, step)
  tokenizer = data.get_tokenizer(cfg.data.tokenizer)
  loss, tokens = evaluate(model, data.eval_batches(cfg.data, n))
  out = {"eval_loss": loss}
  if tokenizer.is_byte_level:
    out["bits_per_byte"] = loss / math.log(2)
  out.update(step=int(step), tokens=tokens, batches=n, workdir=workdir)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every restore at INFO
  f = flags.FLAGS
  if not f.workdir:
    print("error: --workdir is required", file=sys.stderr)
    sys.exit(2)
  try:
    out = run(f.workdir, f.step, f.batches)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
