"""Shared command-line plumbing: every entry point reports a bad config,
flag or path as one line on stderr and exits 2, and keeps library logging
off the console.

config_flags runs `get_config()` and applies `--config.KEY=VALUE` while absl
parses flags, so those errors surface during parsing, wrapped by absl; the
parser below unwraps them to the message that names the field. A config file
that is missing, does not parse or has no `get_config` is caught before that:
config_flags would keep such an error and raise it at the first access, far
from the flag.
"""

from __future__ import annotations

import ast
import os
import sys

from absl import flags, logging

from recursive_lm.config import ConfigError

EXIT_CONFIG_ERROR = 2


def fail(error: BaseException | str) -> None:
  """Print `error: <message>` on one line and exit 2."""
  print("error: " + " ".join(str(error).split()), file=sys.stderr)
  sys.exit(EXIT_CONFIG_ERROR)


def check_loops(loops: int | None, cfg=None) -> None:
  """ConfigError for --loops < 1, or (given the run's config) on a plan without a recurrent core."""
  if loops is None:
    return
  if loops < 1:
    raise ConfigError(f"--loops={loops} must be >= 1 (the recurrent core's loop count)")
  if cfg is not None and cfg.model.plan.preset != "recurrent":
    raise ConfigError(f"--loops={loops}: only a recurrent plan (model.plan.preset='recurrent') takes a loop count; "
                      f"this run's plan is {cfg.model.plan.preset!r}")


def packed_for_decode(model, matmul: str):
  """--matmul: the model the decode loop runs (`layer_weights.decode_model`;
  'native' packs it once, kept for the engine), or ConfigError naming the problem."""
  from recursive_lm.inference import layer_weights  # the model stack, only for the decoding CLIs
  try:
    return layer_weights.decode_model(model, matmul)
  except ValueError as e:
    raise ConfigError(f"--matmul={matmul}: {e}") from None


def _root_config_error(e: BaseException | None) -> ConfigError | None:
  """The innermost ConfigError in e's cause/context chain."""
  found, seen = None, set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    found = e if isinstance(e, ConfigError) else found
    e = e.__cause__ or e.__context__
  return found


def _config_file_arg(argv: list[str]) -> str | None:
  """The FILE[:ARG] value of --config in argv (either spelling), or None."""
  for i, a in enumerate(argv[1:], 1):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_config_file(value: str) -> None:
  """Fail in one line unless FILE (of FILE[:ARG]) is a readable Python file defining get_config."""
  path = value.split(":", 1)[0]
  if not os.path.isfile(path):
    fail(f"--config {path}: no such file")
  try:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
  except (OSError, UnicodeDecodeError) as e:
    fail(f"--config {path}: cannot read it ({e})")
  except SyntaxError as e:
    fail(f"--config {path}: line {e.lineno}: {e.msg} (not a valid Python config file)")
  defined = set()
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      defined.add(node.name)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      defined.update(a.asname or a.name.split(".")[0] for a in node.names)
    elif isinstance(node, ast.Assign):
      defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
  if "get_config" not in defined:
    fail(f"--config {path}: defines no get_config() (a config file is a Python module with get_config(arg=None))")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parser for `app.run(main, flags_parser=parse_flags)`."""
  config_file = _config_file_arg(argv)
  if config_file is not None:
    check_config_file(config_file)
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
  except Exception as e:  # get_config() itself raised (NameError, ImportError, ...): the file is broken
    where = f"--config {config_file.split(':', 1)[0]}: " if config_file else ""
    fail(f"{where}{type(e).__name__}: {e}")


class _LogFile:
  """An append-mode file that holds what is written in memory until `start()`:
  a launch refused before it may write to the workdir (a lock held by another
  run, a different model there) leaves nothing behind."""

  def __init__(self, path: str, started: bool):
    self.path, self._f, self._held, self._closed = path, None, [], False
    if started:
      self.start()

  def start(self) -> None:
    if self._f is None and not self._closed:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      self._f = open(self.path, "a", encoding="utf-8")
      self._f.writelines(self._held)
      self._held = []

  def write(self, text: str) -> None:
    if self._closed:  # records of the interpreter's last moments, after logging.shutdown closed the file
      return
    if self._f is None:
      self._held.append(text)
    else:
      self._f.write(text)

  def flush(self) -> None:
    if self._f is not None:
      self._f.flush()

  def close(self) -> None:
    self._closed = True
    if self._f is not None:
      self._f.close()


_log_file: _LogFile | None = None


def route_library_logs(workdir: str | None, program: str, read_only: bool = False,
                       also_to_console: bool | None = None, deferred: bool = False) -> str | None:
  """Library log records (absl: orbax, jax) go to WORKDIR/logs/PROGRAM.log; the
  console keeps the project's own lines plus warnings and errors.

  absl's handler writes to its stream and echoes to stderr what reaches
  --stderrthreshold (here WARNING unless given), or everything with
  --alsologtostderr: the stack's own switch brings the records back to the
  console. --logtostderr keeps absl's plain console-only behaviour. Without a
  local workdir (none given, one that does not exist for a read-only tool, or
  a remote path) records below WARNING are dropped unless --alsologtostderr or
  --verbosity asks for them. `read_only` tools (evaluate,
  sample) never create the workdir; `also_to_console` sets --alsologtostderr for
  CLIs that parse their own arguments. Writers of a workdir (train, convert)
  pass `deferred` and call `start_library_log()` once they hold its lock.
  Returns the log path or None.
  """
  f = flags.FLAGS
  if not f.is_parsed():  # argparse CLIs (convert): absl sends everything to stderr until flags are parsed
    f.mark_as_parsed()
  if also_to_console is not None:
    f.alsologtostderr = also_to_console
  if f["logtostderr"].value:
    return None
  if not f["stderrthreshold"].present:
    f.stderrthreshold = "warning"
  if not f["verbosity"].present:
    logging.set_verbosity(logging.INFO)
  if not workdir or "://" in workdir or (read_only and not os.path.isdir(workdir)):
    if not (f["alsologtostderr"].value or f["verbosity"].present):
      logging.set_verbosity(logging.WARNING)
    return None
  # Several processes of one run write their own files (JAX_PROCESS_ID is set by multi-process launchers).
  process = os.environ.get("JAX_PROCESS_ID")
  path = os.path.join(workdir, "logs", f"{program}.log" if process in (None, "0") else f"{program}.p{process}.log")
  global _log_file
  _log_file = _LogFile(path, started=not deferred)
  logging.get_absl_handler().python_handler.stream = _log_file
  return path


def start_library_log() -> None:
  """Write the held library records to the workdir's log file from now on (no-op when not routed)."""
  if _log_file is not None:
    _log_file.start()
