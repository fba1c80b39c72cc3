"""Batch generation from a checkpoint through the serving engine:
`python -m recursive_lm.generate --workdir runs/demo --input prompts.jsonl --output out.jsonl
 [--max_new_tokens 64 --temperature 0 --top_k 0 --seed 0 --slots 8 --step N --ignore_eos
  --exit none|confidence:TAU|kl:EPS --depthwise --speculate K --draft_loops N --loops N --matmul xla|native]`.

Input: one JSON object per line, {"id": ..., "prompt": "...", "max_new_tokens": n?, "stop": ["..."]?}
(max_new_tokens defaults to the flag). Output: exactly one line per input
line, in input order: {"id", "completion", "new_tokens", "finish_reason",
"mean_exit_loop"} (finish_reason "length" | "eos" | "stop"; the completion
leaves out EOS and is cut before a stop string; mean_exit_loop: with --exit
the loops run per decoded token, null when none was decoded; for a model
with Mixture-of-Recursions routers the mean recursions its decoded tokens
took; null otherwise, every token running every loop),
or {"id", "error"} for a line that cannot run (broken JSON, no prompt, bad
fields, prompt + new tokens beyond model.max_seq_len): the error names the line and what is wrong, the other
lines still run, and the exit status is 1. Prompts are encoded after BOS when
the run's tokenizer expects it, as `sample` does. --speculate K > 0 decodes
by few-loop self-speculation (K tokens drafted by the model cut after
--draft_loops loops, verified at full depth; the same completions, see
inference/speculate.py); the summary line then gives the draft acceptance. Request i samples with seed
--seed + i (i: its line number from 0), so a line's completion does not
depend on the lines around it.

--loops N runs a recurrent plan's core N times for every request (any N >=
1, more than trained included; with --exit, the most it may run).

--matmul native decodes with the dense weights and tied readout packed for
the CPU kernel of recursive_lm/model/native.py (float32 on CPU; compiled
with $CXX on first use): the same completions up to float32 rounding, 2x
faster at 8 slots on Gemma 3 270M (experiments/gemma3_convert).

The engine's cache is as long as the longest request that fits the model
needs (attention reads all of it at every step). The output file is written once, at the end (via a temporary file), so an
interrupted run leaves no half-written output. Bad flags, a missing run
directory, checkpoint or input file: one `error:` line on stderr, exit 2.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from recursive_lm import cli, data
from recursive_lm.config import ConfigError
from recursive_lm.data.tokenizers import encode_prompt
from recursive_lm.inference import depthwise as depthwise_lib
from recursive_lm.inference import exits
from recursive_lm.checkpoint import load_model as load_checkpoint
from recursive_lm.inference.engine import Engine


def define_flags() -> None:
  """The CLI's flags, defined only when run as a program (see sample.py)."""
  flags.DEFINE_string("workdir", None, "Run directory written by recursive_lm.train (or convert).")
  flags.DEFINE_string("input", None, "JSON-lines file of requests.")
  flags.DEFINE_string("output", None, "JSON-lines file to write, one line per input line.")
  flags.DEFINE_integer("max_new_tokens", 64, "New tokens per request unless its line says otherwise.")
  flags.DEFINE_float("temperature", 0.0, "Softmax temperature; 0: greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0: all.")
  flags.DEFINE_integer("seed", 0, "Sampling seed (line i uses seed + i).")
  flags.DEFINE_integer("slots", 8, "Requests decoded together (KV-cache rows).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("ignore_eos", False, "Do not stop at the tokenizer's EOS.")
  flags.DEFINE_string("exit", "none", "Per-token early exit: none | confidence:TAU | kl:EPS (inference/exits.py).")
  flags.DEFINE_bool("depthwise", False, "Continuous depth-wise batching: one loop of the shared stage per step, "
                    "every slot at its own loop (inference/depthwise.py); needs one repeated cycle-order stage.")
  flags.DEFINE_integer("speculate", 0, "Self-speculation: tokens drafted per round (0: off; inference/speculate.py).")
  flags.DEFINE_integer("draft_loops", 1, "Loops of the repeated stage the --speculate draft runs.")
  flags.DEFINE_integer("loops", None, "Loop count of a recurrent plan's core (default: the plan's repeats).")
  flags.DEFINE_enum("matmul", "xla", ["xla", "native"], "Dense products of the decode loop: XLA's, or the packed "
                    "CPU kernel (model/native.py; float32, CPU).")


def parse_line(n: int, line: str, default_new: int) -> tuple[object, dict | None, str | None]:
  """(id, submit keyword arguments, None) of input line n (1-based), or
  (id or None, None, an error naming the line and its problem)."""
  try:
    obj = json.loads(line)
  except ValueError as e:
    return None, None, f"line {n}: not valid JSON ({e})"
  if not isinstance(obj, dict):
    return None, None, f"line {n}: expected a JSON object, got {type(obj).__name__}"
  rid = obj.get("id")
  prompt = obj.get("prompt")
  if not isinstance(prompt, str):
    return rid, None, f"line {n}: \"prompt\" must be a string, got {'nothing' if prompt is None else repr(prompt)}"
  new = obj.get("max_new_tokens", default_new)
  if isinstance(new, bool) or not isinstance(new, int) or new < 0:
    return rid, None, f"line {n}: \"max_new_tokens\" must be an int >= 0, got {new!r}"
  stop = obj.get("stop", [])
  if isinstance(stop, str):
    stop = [stop]
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
    return rid, None, f"line {n}: \"stop\" must be a list of non-empty strings, got {stop!r}"
  return rid, dict(prompt=prompt, max_new_tokens=new, stop=stop), None


def run(workdir: str, input_path: str, output_path: str, max_new_tokens: int = 64, temperature: float = 0.0,
        top_k: int = 0, seed: int = 0, slots: int = 8, step: int | None = None, ignore_eos: bool = False,
        exit_rule: str = "none", depthwise: bool = False, speculate: int = 0, draft_loops: int = 1,
        loops: int | None = None, matmul: str = "xla") -> dict:
  """Generate for every line of input_path into output_path; returns a summary
  {requests, failed, new_tokens, seconds, tokens_per_s} (with speculate, also
  acceptance: accepted / drafted tokens). Raises ConfigError for user errors."""
  for name, value, low in (("slots", slots, 1), ("max_new_tokens", max_new_tokens, 0), ("top_k", top_k, 0)):
    if value < low:
      raise ConfigError(f"--{name}={value} must be >= {low}")
  if temperature < 0:
    raise ConfigError(f"--temperature={temperature} must be >= 0 (0: greedy)")
  try:
    exits.parse_exit(exit_rule)
  except ValueError as e:
    raise ConfigError(f"--{e}") from None
  cli.check_loops(loops)
  if not os.path.isfile(input_path):
    raise ConfigError(f"--input {input_path}: no such file")
  out_dir = os.path.dirname(os.path.abspath(output_path))
  if not os.path.isdir(out_dir):
    raise ConfigError(f"--output {output_path}: directory {out_dir} does not exist")
  try:
    with open(input_path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"--input {input_path}: cannot read it ({e})") from None
  cfg, model, _ = load_checkpoint(workdir, step)
  if not 0 <= speculate <= cfg.model.max_seq_len:
    raise ConfigError(f"--speculate={speculate} must lie in [0, the model's context {cfg.model.max_seq_len}] (0: off)")
  cli.check_loops(loops, cfg)
  cli.packed_for_decode(model, matmul)
  tokenizer = data.get_tokenizer(cfg.data.tokenizer)
  parsed = [parse_line(i + 1, line, max_new_tokens) for i, line in enumerate(lines)]
  # The cache only as long as the longest request that fits the model needs: attention reads all of it per step.
  cap, need = cfg.model.max_seq_len, 1
  for _, kw, error in parsed:
    if error is None:
      n = len(encode_prompt(tokenizer, kw["prompt"])) + kw["max_new_tokens"]
      need = max(need, n) if n <= cap else need
  if depthwise:
    try:
      depthwise_lib.check_plan(model.plan)
    except ValueError as e:  # no loop to batch by, or a plan it cannot
      raise ConfigError(f"--depthwise: {e}") from None
  try:
    engine = Engine(model, tokenizer, slots=slots, max_len=need, max_top_k=top_k, stop_at_eos=not ignore_eos,
                    exit=exit_rule, depthwise=depthwise, speculate=speculate, draft_loops=draft_loops, loops=loops,
                    matmul=matmul)
  except ValueError as e:  # exits or speculation on a model without loops
    flag = f"--speculate={speculate} --draft_loops={draft_loops}" if speculate else f"--exit={exit_rule}"
    raise ConfigError(f"{flag}: {e}") from None

  results: list[dict | None] = [None] * len(lines)
  for i, (rid, kw, error) in enumerate(parsed):
    if error is None:
      try:
        engine.submit(**kw, temperature=temperature, top_k=top_k, seed=seed + i, id=i)
      except ValueError as e:  # empty or too long once encoded
        error = f"line {i + 1}: {e}"
    results[i] = {"id": rid} if error is None else {"id": rid, "error": error}
  start, total = time.perf_counter(), 0
  for c in engine.stream():
    # mean_exit_loop: with --exit, or a model with routers (its recursions per token); None: every loop ran.
    results[c.id].update(completion=c.text, new_tokens=c.new_tokens, finish_reason=c.finish_reason,
                         mean_exit_loop=c.mean_exit_loop)
    total += c.new_tokens
  seconds = time.perf_counter() - start

  tmp = output_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in results:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, output_path)
  failed = sum("error" in r for r in results)
  summary = {"requests": len(lines), "failed": failed, "new_tokens": total, "seconds": round(seconds, 3),
             "tokens_per_s": round(total / seconds, 1) if seconds > 0 else None}
  if speculate:
    spec = engine.speculation
    summary["acceptance"] = round(spec["accepted"] / spec["drafted"], 4) if spec["drafted"] else None
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  cli.route_library_logs(f.workdir, "generate", read_only=True)
  for name in ("workdir", "input", "output"):
    if f[name].value is None:
      cli.fail(f"--{name} is required")
  try:
    summary = run(f.workdir, f.input, f.output, f.max_new_tokens, f.temperature, f.top_k, f.seed, f.slots, f.step,
                  f.ignore_eos, f.exit, f.depthwise, f.speculate, f.draft_loops, f.loops,
                  f.matmul)
  except ConfigError as e:
    cli.fail(e)
  spec = f", draft acceptance {summary['acceptance']}" if "acceptance" in summary else ""
  print(f"generate: {summary['requests']} requests ({summary['failed']} failed), {summary['new_tokens']} new tokens "
        f"in {summary['seconds']} s ({summary['tokens_per_s']} tokens/s{spec}) -> {f.output}")
  if summary["failed"]:
    print(f"error: {summary['failed']} of {summary['requests']} input lines failed (see their \"error\" in "
          f"{f.output})", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
