"""Evaluate a checkpoint on the validation split:
`python -m recursive_lm.evaluate --workdir runs/demo [--step N] [--batches N] [--loops 1,2,4,8]`.

Prints one JSON line to stdout:
  {"eval_loss": nats/token, "bits_per_byte": (byte-level tokenizers only),
   "step": checkpoint step, "tokens": tokens evaluated, "batches": N, "workdir": DIR}

--loops: one such line per loop count, each with "loops": N, the shared stage
run N times with the trained parameters. A recurrent plan passes the count
to the model (one compiled program for every count, LoRA slots beyond the
trained count reuse the last); other plans are rebuilt at that depth
(`with_loops`).

The batches are `data.eval_batches(run's data config, N)`, the same fixed list
training evaluates on, so with the run's `train.eval_batches` (the default)
the loss matches the run's eval record at that step. For a tokenizer that
expects BOS (a converted pretrained model) every row starts with BOS. Runs on one device.
Errors (no run directory, config or checkpoint) print one line on stderr and
exit 2.
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from recursive_lm import checkpoint, cli, data
from recursive_lm.config import ConfigError
from recursive_lm.checkpoint import load_model as load_checkpoint
from recursive_lm.train_step import make_eval_step


def define_flags() -> None:
  """The CLI's flags. Defined only when run as a program, so that `run` and
  `evaluate` can be imported next to other modules' flags (--workdir, --step)."""
  flags.DEFINE_string("workdir", None, "Run directory written by recursive_lm.train.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("batches", None, "Validation batches (default: the run's train.eval_batches).")
  flags.DEFINE_integer("tokens", None, "Evaluate on about this many validation tokens spread evenly across the whole "
                       "split (0: the whole split); instead of --batches.")
  flags.DEFINE_string("loops", None, "Comma-separated loop counts of the shared stage, one record each (e.g. 1,2,4,8).")


def parse_loops(text: str) -> list[int]:
  """'1,2,4' -> [1, 2, 4]; anything but integers >= 1 is a ConfigError naming the value."""
  try:
    counts = [int(v) for v in text.split(",")]
  except ValueError:
    counts = []
  if not counts or min(counts) < 1:
    raise ConfigError(f"--loops={text!r} must be comma-separated integers >= 1 (e.g. 1,2,4,8)")
  return counts


def evaluate(model, batches, step=None, loops: int | None = None) -> tuple[float, int]:
  """Mean token cross-entropy (nats) of `model` over `batches`, and the token count.

  batches: dicts {'inputs', 'targets'} int32 [B, T]. Sums are accumulated the
  way training's evaluation does (per-batch float32 sums, added in Python).
  loops: a recurrent model's core loop count (None: the plan's); step: an
  eval step of `make_eval_step` to reuse (one compile for every count).
  """
  step = step or make_eval_step(nnx.graphdef(model), loops=loops is not None)
  state = nnx.state(model)
  extra = () if loops is None else (jnp.int32(loops),)
  total, count = 0.0, 0.0
  for batch in batches:
    s, n = step(state, {k: jnp.asarray(v) for k, v in batch.items()}, *extra)
    total, count = total + float(s), count + float(n)
  if count == 0:
    raise ConfigError("evaluate: no validation batches (--batches must be > 0)")
  return total / count, int(count)


def with_loops(model, cfg, loops: int):
  """(model, cfg) running the shared stage `loops` times with the same parameters.

  Only plans whose shared stage has no per-depth slots (no LoRA, no per-depth
  norms): the unique blocks keep their shapes when only the loop count changes.
  Raises ConfigError otherwise.
  """
  import dataclasses
  import jax
  from recursive_lm import plan as plan_lib
  from recursive_lm.model.transformer import Transformer
  p = cfg.model.plan
  if loops < 1:
    raise ConfigError(f"loops={loops} must be >= 1")
  if cfg.model.lora.ranks or p.per_depth_norms:
    raise ConfigError("test-time loops need a plan without per-depth slots (model.lora.rank=0 and "
                      "model.plan.per_depth_norms=False): LoRA / norm slots exist only for the trained depths")
  try:
    num_layers, repeats = plan_lib.with_repeats(p.preset, p.num_layers, p.repeats, loops, (p.prelude, p.coda))
  except ConfigError as e:
    raise ConfigError(f"test-time loops: {e}") from None
  new = dataclasses.replace(p, num_layers=num_layers, repeats=repeats)
  new_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, plan=new))
  with nnx.use_eager_sharding(False):  # built outside a mesh; the trained arrays are copied in below
    new_model = Transformer(new_cfg.model, nnx.Rngs(0))
  old_state, new_state = nnx.state(model), nnx.state(new_model)
  shapes = lambda st: jax.tree.map(lambda x: tuple(x.shape), st)
  if jax.tree.structure(old_state) != jax.tree.structure(new_state) or shapes(old_state) != shapes(new_state):
    raise ConfigError(f"test-time loops={loops}: parameter shapes differ from the trained model's")
  nnx.update(new_model, old_state)
  return new_model, new_cfg


def accuracy_by_length(model, cfg, lengths, n_examples: int = 256, loops: int | None = None,
                       batch_size: int = 64) -> dict[int, float]:
  """Greedy exact-match accuracy (every answer byte the argmax) per length, synthetic runs.

  Teacher-forced argmax over the answer positions: equal to greedy decoding's
  exact match, since a greedy decode stays on the reference while it is right.
  Examples come from the held-out 'eval' split. `loops` re-runs the shared stage
  that many times (see with_loops; a recurrent plan takes the count as it is).
  """
  import numpy as np
  if cfg.data.source != "synthetic":
    raise ConfigError(f"accuracy_by_length needs data.source='synthetic' (got {cfg.data.source!r})")
  run = {}
  if loops is not None and model.recurrent:
    run = {"loops": jnp.int32(loops)}
  elif loops is not None:
    model, cfg = with_loops(model, cfg, loops)
  graphdef, state = nnx.split(model)
  import jax
  fwd = jax.jit(lambda st, x, run: jnp.argmax(nnx.merge(graphdef, st)(x, **run)[0], axis=-1))
  return accuracy_of_predictor(lambda x: np.asarray(fwd(state, jnp.asarray(x), run)), cfg, lengths, n_examples,
                               batch_size)


def accuracy_of_predictor(predict, cfg, lengths, n_examples: int = 256, batch_size: int = 64) -> dict[int, float]:
  """Exact-match accuracy per length of `predict(inputs int32 [B, T]) -> predicted next ids [B, T]`."""
  import numpy as np
  from recursive_lm.data import synthetic
  out = {}
  for n in lengths:
    seq_len = max(cfg.data.seq_len, synthetic.max_example_len(cfg.data.task, n) - 1)
    dcfg = dataclasses_replace(cfg.data, seq_len=seq_len)
    hits = []
    for b in synthetic.batches(dcfg, (n,), n_examples, batch_size):
      hits.append(synthetic.exact_match(np.asarray(predict(b["inputs"])), b["targets"]))
    out[int(n)] = float(np.concatenate(hits).mean())
  return out


def dataclasses_replace(obj, **kw):
  import dataclasses
  return dataclasses.replace(obj, **kw)


def run_loops(workdir: str, loops: list[int], step: int | None = None, n_batches: int | None = None) -> list[dict]:
  """`run`'s record for each loop count (with "loops": N), the checkpoint loaded once. Raises ConfigError."""
  cfg = checkpoint.load_config(workdir)
  n = cfg.train.eval_batches if n_batches is None else n_batches
  if n < 1:
    raise ConfigError(f"--batches={n} must be > 0")
  if min(loops) < 1:
    raise ConfigError(f"--loops: loop count {min(loops)} must be >= 1")
  cfg, model, step = load_checkpoint(workdir, step)
  batches = list(data.eval_batches(cfg.data, n))
  out = []
  if model.recurrent:
    eval_step = make_eval_step(nnx.graphdef(model), loops=True)
    for r in loops:
      out.append({"loops": r, **_record(cfg, *evaluate(model, batches, eval_step, r), step, n, workdir)})
  else:
    for r in loops:
      looped, looped_cfg = with_loops(model, cfg, r)
      out.append({"loops": r, **_record(looped_cfg, *evaluate(looped, batches), step, n, workdir)})
  return out


def spread_batches(dcfg, tokens: int) -> list[dict]:
  """Validation batches covering `tokens` target tokens (0 or more than the split: all of it),
  the windows evenly spaced over the whole split, not its first ones.

  Why: the first batches of a split are one stretch of one document, so their
  loss is not an estimate of the split's. Rows are the split's own windows
  (data.TokenWindows, BOS as the run expects); the last batch is padded by
  repeating its first rows with their targets masked (-1 is never a target:
  the eval step's mask drops them). Returns dicts of int32 [B, T].
  """
  import numpy as np
  from recursive_lm.data.pipeline import TokenWindows, load_splits, window_bos
  if dcfg.source == "synthetic":
    raise ConfigError("--tokens needs a text source (synthetic runs evaluate held-out examples; use --batches)")
  tok, _, val = load_splits(dcfg)
  windows = TokenWindows(val, dcfg.seq_len, window_bos(tok))
  n_win = len(windows)
  want = n_win if tokens <= 0 else min(n_win, -(-tokens // dcfg.seq_len))
  index = np.unique(np.floor(np.arange(want) * (n_win / want)).astype(np.int64))  # evenly spaced, distinct
  rows = np.stack([windows[i] for i in index])
  b = dcfg.batch_size
  out = []
  for k in range(0, len(rows), b):
    chunk = rows[k:k + b]
    inputs, targets = chunk[:, :-1], chunk[:, 1:].copy()
    if len(chunk) < b:  # fixed batch shape: one compile; padded rows carry no targets
      pad = b - len(chunk)
      inputs = np.concatenate([inputs, np.resize(inputs, (pad, inputs.shape[1]))])
      targets = np.concatenate([targets, np.full((pad, targets.shape[1]), -1, targets.dtype)])
    out.append({"inputs": np.ascontiguousarray(inputs, np.int32), "targets": np.ascontiguousarray(targets, np.int32)})
  return out


def _record(cfg, loss: float, tokens: int, step: int, n: int, workdir: str) -> dict:
  out = {"eval_loss": loss}
  if data.get_tokenizer(cfg.data.tokenizer).is_byte_level:
    out["bits_per_byte"] = loss / math.log(2)
  out.update(step=int(step), tokens=tokens, batches=n, workdir=workdir)
  return out


def run(workdir: str, step: int | None = None, n_batches: int | None = None, tokens: int | None = None) -> dict:
  """Load the checkpoint of `workdir` (latest or `step`) and evaluate it. Raises ConfigError.

  tokens: evaluate on `spread_batches(data, tokens)` instead of the first n_batches."""
  cfg = checkpoint.load_config(workdir)
  n = cfg.train.eval_batches if n_batches is None else n_batches
  if n < 1:
    raise ConfigError(f"--batches={n} must be > 0")
  if tokens is not None and n_batches is not None:
    raise ConfigError("--tokens and --batches exclude each other")
  cfg, model, step = load_checkpoint(workdir, step)
  batches = data.eval_batches(cfg.data, n) if tokens is None else spread_batches(cfg.data, tokens)
  n = len(batches)
  out = _record(cfg, *evaluate(model, batches), step, n, workdir)
  if cfg.data.source == "synthetic":
    from recursive_lm.data.synthetic import parse_lengths
    for split in ("train", "eval"):
      acc = accuracy_by_length(model, cfg, parse_lengths(getattr(cfg.data, f"{split}_lengths")))
      out[f"accuracy_{split}_lengths"] = {str(k): v for k, v in acc.items()}
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  cli.route_library_logs(f.workdir, "evaluate", read_only=True)
  if not f.workdir:
    cli.fail("--workdir is required")
  try:
    if f.loops is not None:
      for record in run_loops(f.workdir, parse_loops(f.loops), f.step, f.batches):
        print(json.dumps(record), flush=True)
      return
    out = run(f.workdir, f.step, f.batches, f.tokens)
  except ConfigError as e:
    cli.fail(e)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
