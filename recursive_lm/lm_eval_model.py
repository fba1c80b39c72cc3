"""Our checkpoints as an lm-evaluation-harness model (`pip install -e '.[eval]'`, lm-eval 0.4.13).

  python -m recursive_lm.lm_eval_model --model recursive_lm --model_args workdir=runs/demo,loops=2 \
      --tasks rlm_local_mc --include_path recursive_lm/eval_tasks

The harness finds models only in its registry, and nothing registers ours
when `lm_eval` starts, so this module is the CLI: it registers the model
("recursive_lm") and hands the arguments to lm_eval's own command line. From
Python: `RecursiveLM(workdir="runs/demo")` is an `lm_eval.api.model.LM`.

Across test-time loop counts (scores, the gain of each extra loop, overthinking):
  python -m recursive_lm.lm_eval_model loops --workdir W --loops 1,2,4 --tasks rlm_local_mc \
      --include_path recursive_lm/eval_tasks

model_args: workdir (required), step (default latest), loops (test-time loop
count of the shared stage; evaluate.with_loops, or the recurrent core's count),
batch_size (rows per forward, default 8), slots (Engine slots for
generate_until, default 8).

Token conventions: a context is `encode_prompt` (BOS first when the run's
tokenizer expects it); a continuation is encoded on its own and scored after
it. Sequences are right-padded to fixed length buckets (powers of two up to
model.max_seq_len) so a task compiles a handful of programs, not one per
request. A request longer than the context keeps its last max_seq_len + 1
tokens (truncated from the left, as the harness expects), said once on stderr.
A byte-level run has no BOS: an empty context leaves the first token of the
continuation (or document) without a prediction, and it is not scored.
"""

from __future__ import annotations

import sys

import numpy as np

try:
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
except ImportError as e:  # the optional extra: say how to get it
  raise ImportError("recursive_lm.lm_eval_model needs lm-evaluation-harness: pip install -e '.[eval]'") from e


def _bucket(n: int, cap: int) -> int:
  """The padded length of an n-token row: the next power of two >= 16, at most cap."""
  b = 16
  while b < n:
    b *= 2
  return min(b, cap)


@register_model("recursive_lm")
class RecursiveLM(LM):
  """loglikelihood, loglikelihood_rolling and generate_until on a run directory."""

  def __init__(self, workdir: str, step=None, loops=None, batch_size=8, slots=8, **unused):
    super().__init__()
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from recursive_lm import data
    from recursive_lm.checkpoint import load_model as load_checkpoint
    cfg, model, self.step = load_checkpoint(workdir, None if step in (None, "") else int(step))
    self.loops = None if loops in (None, "") else int(loops)
    self._run = {}
    if self.loops is not None and cfg.model.plan.preset == "recurrent":
      self._run = {"loops": jnp.int32(self.loops)}
    elif self.loops is not None:
      from recursive_lm.evaluate import with_loops
      model, cfg = with_loops(model, cfg, self.loops)
    self.cfg, self.model = cfg, model
    self.tokenizer = data.get_tokenizer(cfg.data.tokenizer)
    self.max_length = cfg.model.max_seq_len
    # the harness passes --batch_size through (possibly "auto"): a number is used, anything else is the default
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
    self.slots = int(slots)
    self._warned = False
    graphdef, state = nnx.split(model)
    self._state = state

    def token_logprobs(st, inputs, targets, run):
      """inputs, targets int32 [B, T] -> (log p(target) [B, T], target is the argmax [B, T])."""
      logits = nnx.merge(graphdef, st)(inputs, **run)[0].astype(jnp.float32)
      logp = jax.nn.log_softmax(logits, axis=-1)
      safe = jnp.maximum(targets, 0)
      lp = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
      return lp, jnp.argmax(logits, axis=-1) == safe

    self._fwd = jax.jit(token_logprobs)

  # ---- scoring ------------------------------------------------------------------------------------------

  def _truncate(self, ids: np.ndarray) -> np.ndarray:
    if ids.size > self.max_length + 1:
      if not self._warned:
        print(f"recursive_lm: requests longer than the context ({self.max_length} tokens) are truncated from the "
              "left", file=sys.stderr)
        self._warned = True
      ids = ids[-(self.max_length + 1):]
    return ids

  def _score(self, rows: list[tuple[np.ndarray, int]]) -> list[tuple[float, bool]]:
    """rows: (ids int [N], k): sum of log p over the last k tokens of ids given the rest, and greedy.

    Sorted by length and batched in fixed buckets; padding targets are -1 and not counted."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [None] * len(rows)
    for s in range(0, len(order), self.batch_size):
      idx = order[s:s + self.batch_size]
      width = _bucket(max(len(rows[i][0]) - 1 for i in idx), self.max_length)
      inputs = np.zeros((self.batch_size, width), np.int32)
      targets = np.full((self.batch_size, width), -1, np.int32)
      for r, i in enumerate(idx):
        ids = rows[i][0]
        inputs[r, :len(ids) - 1] = ids[:-1]
        targets[r, :len(ids) - 1] = ids[1:]
      lp, greedy = self._fwd(self._state, inputs, targets, self._run)
      lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
      for r, i in enumerate(idx):
        n, k = len(rows[i][0]) - 1, rows[i][1]
        out[i] = (float(lp[r, n - k:n].sum()), bool(greedy[r, n - k:n].all()))
    return out

  def _context(self, text: str) -> np.ndarray:
    from recursive_lm.data.tokenizers import encode_prompt
    return np.asarray(encode_prompt(self.tokenizer, text), np.int32)

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    """[(log p(continuation | context), is greedy)] per request (args: context, continuation)."""
    rows = []
    for req in requests:
      context, continuation = req.args
      ctx = self._context(context)
      cont = np.asarray(self.tokenizer.encode(continuation), np.int32)
      ids = self._truncate(np.concatenate([ctx, cont]))
      rows.append((ids, min(len(cont), len(ids) - 1)))
    return self._score(rows)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    """[sum of log p of every document token] (args: (text,)). Long documents are scored in
    windows of max_seq_len targets, each token once, each window with the tokens before it as context."""
    out = []
    T = self.max_length
    for req in requests:
      ids = self._context(req.args[0])
      rows, i, n = [], 0, len(ids) - 1  # n targets ids[1..n]
      while i < n:
        e = min(i + T, n)             # this window scores targets ids[i+1 .. e]
        start = max(0, e - T)         # inputs ids[start .. e-1]: as much context as fits
        rows.append((ids[start:e + 1], e - i))
        i = e
      out.append(sum(lp for lp, _ in self._score(rows)) if rows else 0.0)
    return out

  # ---- generation ---------------------------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False):
    """Greedy continuations through inference.Engine, cut before the first stop string.
    args: (context, {"until": [...], "max_gen_toks": N, ...}); requests with equal settings run together."""
    from recursive_lm.inference import Engine
    if not hasattr(self, "_engine"):
      self._engine = Engine(self.model, self.tokenizer, slots=self.slots, loops=self._run and self.loops or None)
    groups: dict = {}
    for j, req in enumerate(requests):
      context, kw = req.args
      until = kw.get("until", [])
      until = [until] if isinstance(until, str) else list(until)
      n = int(kw.get("max_gen_toks", 64))
      groups.setdefault((tuple(until), n), []).append((j, context))
    out = [None] * len(requests)
    for (until, n), items in groups.items():
      keep = self.max_length - n
      prompts = []
      for _, context in items:
        ids = self._context(context)
        if ids.size > keep:
          if not self._warned:
            print(f"recursive_lm: prompts longer than the context ({self.max_length} tokens) less max_gen_toks "
                  "are truncated from the left", file=sys.stderr)
            self._warned = True
          ids = ids[-keep:]
        prompts.append(ids)
      done = self._engine.generate(prompts, max_new_tokens=n, stop=list(until))
      for (j, _), c in zip(items, done):
        out[j] = c.text
    return out


def across_loops(workdir: str, loops: list[int], tasks: list[str], include_path: str | None = None,
                 limit: int | None = None, batch_size: int = 8, step=None) -> list[dict]:
  """Every task's score at each test-time loop count, with the loop metrics.

  One record per (task, loop count): {"task", "metric", "loops", "score", "gain" (score minus the
  previous count's, None for the first), "overthinking" (share of the examples right at the
  previous count that this count gets wrong, None for the first)}. Per-example correctness comes
  from the harness's own sample logs, so the score is exactly the harness's.
  """
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager
  manager = TaskManager(include_path=include_path) if include_path else TaskManager()
  per_loop = []
  for r in loops:
    lm = RecursiveLM(workdir=workdir, step=step, loops=r, batch_size=batch_size)
    per_loop.append(simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                    log_samples=True))
  out = []
  for task in tasks:
    prev = None
    for r, res in zip(loops, per_loop):
      scores = res["results"][task]
      key = next(k for k in scores if k.endswith(",none") and not k.endswith("_stderr,none") and k != "alias")
      metric = key.split(",")[0]
      right = {s["doc_id"]: bool(s[metric]) for s in res["samples"][task]}
      rec = {"task": task, "metric": metric, "loops": r, "score": float(scores[key]), "gain": None,
             "overthinking": None}
      if prev is not None:
        rec["gain"] = rec["score"] - prev[0]
        was = [d for d, ok in prev[1].items() if ok]
        rec["overthinking"] = (sum(not right[d] for d in was) / len(was)) if was else 0.0
      out.append(rec)
      prev = (rec["score"], right)
  return out


def _loops_main(argv: list[str]) -> None:
  """`python -m recursive_lm.lm_eval_model loops --workdir W --loops 1,2,4 --tasks T[,T] [--include_path D]`:
  one JSON line per (task, loop count) from `across_loops`."""
  import argparse
  import json
  from recursive_lm import cli
  from recursive_lm.config import ConfigError
  from recursive_lm.evaluate import parse_loops
  p = argparse.ArgumentParser(prog="python -m recursive_lm.lm_eval_model loops")
  p.add_argument("--workdir", required=True)
  p.add_argument("--loops", required=True)
  p.add_argument("--tasks", required=True)
  p.add_argument("--include_path", default=None)
  p.add_argument("--limit", type=int, default=None)
  p.add_argument("--batch_size", type=int, default=8)
  a = p.parse_args(argv)
  try:
    records = across_loops(a.workdir, parse_loops(a.loops), a.tasks.split(","), a.include_path, a.limit,
                           a.batch_size)
  except ConfigError as e:
    cli.fail(e)
  for rec in records:
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  if sys.argv[1:2] == ["loops"]:
    _loops_main(sys.argv[2:])
  else:
    from lm_eval.__main__ import cli_evaluate
    sys.argv[0] = "lm_eval"
    cli_evaluate()
