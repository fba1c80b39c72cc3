"""Sample from a checkpoint:
`python -m recursive_lm.sample --workdir runs/demo --prompt "def " --max_new_tokens 200
 [--temperature 0.8 --top_k 40 --seed 0 --step N]`.

The prompt is encoded with the run's tokenizer (data.tokenizer in its
config.json); stdout gets the decoded prompt + continuation. Temperature 0
(the default) is greedy. Errors (no run directory, config or checkpoint, an
empty prompt, prompt + new tokens beyond model.max_seq_len) print one line on
stderr and exit 2.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags

from recursive_lm import cli, data
from recursive_lm.config import ConfigError
from recursive_lm.inference.decode import generate, load_checkpoint


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


def sample(workdir: str, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
           seed: int = 0, step: int | None = None) -> str:
  """Decoded prompt + continuation. Raises ConfigError for user errors."""
  cfg, model, _ = load_checkpoint(workdir, step)
  tokenizer = data.get_tokenizer(cfg.data.tokenizer)
  ids = np.asarray(tokenizer.encode(prompt), np.int32)
  if ids.size == 0:
    raise ConfigError(f"--prompt={prompt!r} encodes to no tokens; give at least one character")
  try:
    out = generate(model, ids[None, :], max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
  except ValueError as e:  # max_seq_len, negative counts: the user's arguments
    raise ConfigError(str(e)) from None
  return tokenizer.decode(np.asarray(out[0]))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  cli.route_library_logs(f.workdir, "sample", read_only=True)
  for name, value in (("workdir", f.workdir), ("prompt", f.prompt)):
    if value is None:
      cli.fail(f"--{name} is required")
  try:
    text = sample(f.workdir, f.prompt, f.max_new_tokens, f.temperature, f.top_k, f.seed, f.step)
  except ConfigError as e:
    cli.fail(e)
  sys.stdout.write(text + "\n")
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main)
