"""Shared command-line plumbing: every entry point reports a bad config,
flag or path as one line on stderr and exits 2.

config_flags runs `get_config()` and applies `--config.KEY=VALUE` while absl
parses flags, so those errors surface during parsing, wrapped by absl; the
parser below unwraps them to the message that names the field.
"""

from __future__ import annotations

import sys

from absl import flags, logging

from recursive_lm.config import ConfigError

EXIT_CONFIG_ERROR = 2


def fail(error: BaseException | str) -> None:
  """Print `error: <message>` on one line and exit 2."""
  print("error: " + " ".join(str(error).split()), file=sys.stderr)
  sys.exit(EXIT_CONFIG_ERROR)


def _root_config_error(e: BaseException | None) -> ConfigError | None:
  """The innermost ConfigError in e's cause/context chain."""
  found, seen = None, set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    found = e if isinstance(e, ConfigError) else found
    e = e.__cause__ or e.__context__
  return found


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parser for `app.run(main, flags_parser=parse_flags)`."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # bad variant string, --config.train.steps=abc, missing --config
    fail(_root_config_error(e) or e)
  except (AttributeError, KeyError) as e:  # an override of a field that does not exist
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(message))
      e = e.args[0]
    message = str(e.args[0] if e.args else e)
    field = message.split("'")[1] if message.count("'") >= 2 else None
    names = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    names = [n for n in names if field in n.split(".")] or names
    fail(f"{' '.join(names)}: no such config field ({message})")


def quiet_logging() -> None:
  """WARNING unless --verbosity was given: orbax and jax log every restore at INFO."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
