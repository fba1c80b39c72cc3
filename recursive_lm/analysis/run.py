"""A trained run, loaded for analysis: config, model, metrics, accounting, data.

  from recursive_lm import analysis
  run = analysis.load_run("runs/demo")          # latest checkpoint
  run.train[-1]["loss"], run.eval[-1]["eval_loss"], run.accounting["unique_params"]
  batches = run.eval_batches()                   # the run's own validation batches

Everything heavy beyond the model itself (accounting, tokenizer, eval
batches) is computed on first use and cached on the object, so loading a run
in a notebook costs one checkpoint restore.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

from recursive_lm import metrics
from recursive_lm.config import Config, ConfigError


def resolve_workdir(workdir: str) -> str:
  """The run directory `workdir` names, as an absolute path.

  A relative path that does not exist from the current directory is also
  looked up from each parent directory: notebooks run with their own folder
  as the current directory, while run paths in commands and docs are written
  from the repository root ("runs/demo").
  """
  if os.path.isabs(workdir) or os.path.isdir(workdir):
    return os.path.abspath(workdir)
  tried, here = [], os.getcwd()
  while True:
    candidate = os.path.join(here, workdir)
    tried.append(candidate)
    if os.path.isdir(candidate):
      return candidate
    parent = os.path.dirname(here)
    if parent == here:
      break
    here = parent
  raise ConfigError(f"run directory {workdir!r} not found (looked in {', '.join(tried[:3])}"
                    f"{' and parents' if len(tried) > 3 else ''}); train one with "
                    f"`python -m recursive_lm.train --config configs/default.py --workdir {workdir}`")


def split_metrics(records: list[dict]) -> tuple[list[dict], list[dict]]:
  """metrics.jsonl records -> (train records, eval records), each sorted by step.

  Training writes two kinds of record: train ones carry 'loss', eval ones
  'eval_loss'; nothing else tells them apart.
  """
  train = sorted((r for r in records if "loss" in r), key=lambda r: r["step"])
  evals = sorted((r for r in records if "eval_loss" in r), key=lambda r: r["step"])
  return train, evals


@dataclasses.dataclass(eq=False)
class Run:
  """One run directory at one checkpoint.

  cfg: the run's validated Config; model: the restored Transformer (one
  device); step: the checkpoint step; metrics: every metrics.jsonl record;
  train / eval: those records split by kind, sorted by step (records after
  `step` included: a run loaded at an earlier checkpoint still shows its
  whole curve).
  """

  workdir: str
  cfg: Config
  model: object
  step: int
  metrics: list[dict]
  train: list[dict]
  eval: list[dict]

  @functools.cached_property
  def accounting(self) -> dict:
    """`recursive_lm.analysis.accounting.describe(cfg)`: parameters, FLOPs/token, plan."""
    from recursive_lm.analysis import accounting
    return accounting.describe(self.cfg)

  def describe(self) -> dict:
    """The same as `accounting` (named after `accounting.describe`)."""
    return self.accounting

  @functools.cached_property
  def tokenizer(self):
    from recursive_lm import data
    return data.get_tokenizer(self.cfg.data.tokenizer)

  @property
  def is_byte_level(self) -> bool:
    return bool(self.tokenizer.is_byte_level)

  @property
  def plan(self):
    return self.model.plan

  @property
  def depth(self) -> int:
    """L_eff, the number of effective layers."""
    return self.model.plan.depth

  def layer_labels(self, with_embedding: bool = False) -> list[str]:
    """One short label per effective layer (block and repeat, and the stage
    when the plan has several), e.g. 'b1 r0'; 'emb' first with_embedding."""
    plan = self.model.plan
    many = len(plan.stages) > 1
    labels = [(f"{plan.stages[l.stage].name} " if many else "") + f"b{l.block} r{l.repeat}" for l in plan.layers()]
    return (["emb"] if with_embedding else []) + labels

  def eval_batches(self, n: int | None = None) -> list[dict]:
    """The first n validation batches (default: the run's train.eval_batches),
    {'inputs', 'targets'}: int32 [B, T] numpy arrays; the ones training evaluated on."""
    n = self.cfg.train.eval_batches if n is None else int(n)
    if n < 1:
      raise ConfigError(f"eval_batches: n={n} must be >= 1")
    cache = self.__dict__.setdefault("_eval_batches", {})
    if n not in cache:
      from recursive_lm import data
      cache[n] = data.eval_batches(self.cfg.data, n)
    return cache[n]

  def to_bits_per_byte(self, nats: float) -> float | None:
    """A loss in nats/token as bits per byte, or None for a tokenizer that is not byte-level."""
    return nats / math.log(2) if self.is_byte_level else None

  def summary(self) -> str:
    """A few lines: the run, its plan, its accounting and its last losses."""
    a = self.accounting
    m = self.cfg.model
    lines = [
        f"run {self.workdir} at step {self.step} of {self.cfg.train.steps}",
        f"plan {m.plan.preset}: {a['unique_blocks']} unique blocks -> {a['effective_depth']} effective layers "
        f"({', '.join(f'{s.name}: {s.unique_blocks}x{s.repeats} {s.order}' for s in self.plan.stages)}); "
        f"block={m.block}, d_model={m.d_model}, LoRA {dict(m.lora.ranks) or 'none'}",
        f"params: unique {a['unique_params']:,}  LoRA {a['lora_params']:,}  total {a['total_params']:,}  "
        f"(untied model of equal depth: {a['untied_params']:,}; embedding {a['embedding_params']:,})",
    ]
    if a["flops_per_token"] is not None:
      lines.append(f"training FLOPs/token at T={a['seq_len']}: {a['flops_per_token']:,}")
    if self.train:
      lines.append(f"last train loss {self.train[-1]['loss']:.4f} (step {self.train[-1]['step']})")
    if self.eval:
      e = self.eval[-1]
      bpb = self.to_bits_per_byte(e["eval_loss"])
      lines.append(f"last eval loss {e['eval_loss']:.4f} nats/token" + (f" = {bpb:.3f} bits/byte" if bpb else "")
                   + f" (step {e['step']})")
    return "\n".join(lines)

  def __repr__(self) -> str:
    return f"Run({self.workdir!r}, step={self.step}, depth={self.depth}, block={self.cfg.model.block!r})"


def load_run(workdir: str, step: int | None = None) -> Run:
  """Load a run directory (latest checkpoint, or `step`) for analysis.

  Raises ConfigError with one readable line when the directory, its config
  or the checkpoint is missing. A run without metrics.jsonl loads with empty
  metrics.
  """
  from recursive_lm.checkpoint import load_model as load_checkpoint  # readable errors for missing pieces

  path = resolve_workdir(workdir)
  cfg, model, step = load_checkpoint(path, step)
  try:
    records = metrics.read(path)
  except FileNotFoundError:
    records = []
  train, evals = split_metrics(records)
  return Run(workdir=path, cfg=cfg, model=model, step=int(step), metrics=records, train=train, eval=evals)


__all__ = ["Run", "load_run", "resolve_workdir", "split_metrics"]
