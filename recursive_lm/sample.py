"""Sample from a checkpoint:
`python -m recursive_lm.sample --workdir runs/demo --prompt "def " --max_new_tokens 200
 [--temperature 0.8 --top_k 40 --seed 0 --step N --ignore_eos --loops N --matmul xla|native]`.

The prompt is encoded with the run's tokenizer (data.tokenizer in its
config.json), after BOS when the tokenizer expects it (a converted pretrained
model); stdout gets the decoded prompt + continuation, without that BOS. The
continuation ends before the tokenizer's EOS, if it has one and the model
produces it, unless --ignore_eos. Temperature 0 (the default) is greedy.
One request of the serving engine (`inference.engine.Engine`, one slot, its
cache as long as prompt + new tokens), so `sample` and `generate` decode alike.
--loops N runs a recurrent plan's core N times (any N >= 1, more than
trained included; default: the plan's repeats). --matmul native decodes
with the packed CPU kernel (`generate`'s docstring).
Errors (no run directory, config or checkpoint, a prompt that encodes to no
tokens, prompt + new tokens beyond model.max_seq_len, --loops < 1 or on a
plan without a recurrent core) print one line on stderr
and exit 2.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags

from recursive_lm import cli, data
from recursive_lm.config import ConfigError
from recursive_lm.data.tokenizers import encode_prompt
from recursive_lm.checkpoint import load_model as load_checkpoint
from recursive_lm.inference.engine import Engine


def define_flags() -> None:
  """The CLI's flags. Defined only when run as a program, so that `sample` can
  be imported next to other modules' flags (--workdir, --step)."""
  flags.DEFINE_string("workdir", None, "Run directory written by recursive_lm.train.")
  flags.DEFINE_string("prompt", None, "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.0, "Softmax temperature; 0: greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0: all.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("ignore_eos", False, "Generate all --max_new_tokens even past the tokenizer's EOS.")
  flags.DEFINE_integer("loops", None, "Loop count of a recurrent plan's core (default: the plan's repeats).")
  flags.DEFINE_enum("matmul", "xla", ["xla", "native"], "Dense products of the decode loop: XLA's, or the packed "
                    "CPU kernel (model/native.py; float32, CPU).")


def sample(workdir: str, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
           seed: int = 0, step: int | None = None, ignore_eos: bool = False, loops: int | None = None,
           matmul: str = "xla") -> str:
  """Decoded prompt + continuation (BOS left out, cut before EOS). Raises ConfigError for user errors."""
  cli.check_loops(loops)
  cfg, model, _ = load_checkpoint(workdir, step)
  cli.check_loops(loops, cfg)
  cli.packed_for_decode(model, matmul)
  tokenizer = data.get_tokenizer(cfg.data.tokenizer)
  ids = np.asarray(encode_prompt(tokenizer, prompt), np.int32)
  if ids.size == 0:
    raise ConfigError(f"--prompt={prompt!r} encodes to no tokens; give at least one character")
  cap = cfg.model.max_seq_len
  try:
    engine = Engine(model, tokenizer, slots=1, max_len=min(max(ids.size + max_new_tokens, 1), cap),
                    max_top_k=max(top_k, 0), stop_at_eos=not ignore_eos, seed=seed, loops=loops,
                    matmul=matmul)
    out = engine.generate([ids], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)[0]
  except ValueError as e:  # max_seq_len, negative counts: the user's arguments
    raise ConfigError(str(e)) from None
  new = out.tokens[:-1] if out.finish_reason == "eos" else out.tokens
  return tokenizer.decode(np.concatenate([ids[1 if tokenizer.add_bos else 0:], np.asarray(new, np.int32)]))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  cli.route_library_logs(f.workdir, "sample", read_only=True)
  for name, value in (("workdir", f.workdir), ("prompt", f.prompt)):
    if value is None:
      cli.fail(f"--{name} is required")
  try:
    text = sample(f.workdir, f.prompt, f.max_new_tokens, f.temperature, f.top_k, f.seed, f.step, f.ignore_eos,
                  f.loops, f.matmul)
  except ConfigError as e:
    cli.fail(e)
  sys.stdout.write(text + "\n")
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main)
