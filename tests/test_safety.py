"""Safe loading: nothing in the repository deserialises with pickle or runs
text it reads at run time.

Checkpoints are orbax (tensorstore + JSON), data iterators JSON, token arrays
.npy opened without pickle, configs Python files loaded by ml_collections the
way any config module is imported. This test parses every .py file in the
repository (this file excepted) and fails on:
  - importing pickle, cPickle, _pickle, cloudpickle, dill, shelve, marshal or
    joblib (also through __import__ / importlib.import_module);
  - torch.load, pandas.read_pickle, yaml.load without an explicit safe Loader,
    yaml.unsafe_load / full_load;
  - np.load / numpy.load / jnp.load with allow_pickle=True;
  - eval( / exec( of anything but a string written in the file itself (a
    literal, or a module-level name bound to one): executing a file's or a
    config's contents read at run time is the hole this closes.
The checker is run on a snippet holding each pattern first, so a scan that
finds nothing has been shown able to find something.

One import is allowed, by file: tests/test_data.py pickles a TokenWindows
in memory (dumps/loads of its own bytes) because grain's worker processes
receive the data source that way; pickle.load of a file stays forbidden there
too.
"""

import ast
import os

import pytest

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
SKIP_DIRS = {".git", "__pycache__", "build", "dist", ".venv", "venv", "node_modules", ".benchmarks", ".eggs"}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "shelve", "marshal", "joblib"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
ALLOWED_IMPORTS = {os.path.join("tests", "test_data.py"): {"pickle"}}


def python_files():
  out = []
  for root, dirs, files in os.walk(REPO):
    dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
    for name in sorted(files):
      path = os.path.join(root, name)
      if name.endswith(".py") and os.path.abspath(path) != HERE:
        out.append(path)
  return out


def _dotted(node) -> str:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    base = _dotted(node.value)
    return f"{base}.{node.attr}" if base else ""
  return ""


def _module_string_constants(tree) -> set[str]:
  names = set()
  for node in tree.body:
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
      names.update(t.id for t in node.targets if isinstance(t, ast.Name))
  return names


def findings(source: str, filename: str = "<snippet>", allowed_imports=frozenset()) -> list[str]:
  """'file:line: what' for every unsafe pattern in `source`."""
  tree = ast.parse(source, filename)
  constants = _module_string_constants(tree)
  out = []

  def report(node, what):
    out.append(f"{filename}:{node.lineno}: {what}")

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] in PICKLE_MODULES - allowed_imports:
          report(node, f"import {alias.name}")
    elif isinstance(node, ast.ImportFrom):
      if (node.module or "").split(".")[0] in PICKLE_MODULES - allowed_imports:
        report(node, f"from {node.module} import ...")
    elif isinstance(node, ast.Call):
      name = _dotted(node.func)
      short = name.rsplit(".", 1)[-1]
      kwargs = {k.arg: k.value for k in node.keywords if k.arg}
      if name in ("__import__", "importlib.import_module", "import_module") and node.args and isinstance(
          node.args[0], ast.Constant) and str(node.args[0].value).split(".")[0] in PICKLE_MODULES:
        report(node, f"{name}({node.args[0].value!r})")
      elif name == "torch.load" or short in ("read_pickle", "unsafe_load", "full_load", "Unpickler") or (
          short == "load" and name.split(".")[0] in PICKLE_MODULES):
        report(node, f"{name}(...)")
      elif name == "yaml.load":
        loader = kwargs.get("Loader", node.args[1] if len(node.args) > 1 else None)
        if loader is None or _dotted(loader).rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
          report(node, "yaml.load without a safe Loader")
      elif short == "load" and name.split(".")[0] in ("np", "numpy", "jnp", "onp"):
        flag = kwargs.get("allow_pickle")
        if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
          report(node, f"{name}(..., allow_pickle={ast.unparse(flag)})")
      elif name in ("eval", "exec", "builtins.eval", "builtins.exec"):
        arg = node.args[0] if node.args else None
        literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
        if not (literal or (isinstance(arg, ast.Name) and arg.id in constants)):
          report(node, f"{name}({ast.unparse(arg) if arg is not None else ''}) of text not written in the file")
  return out


UNSAFE_SNIPPET = '''
import pickle
import cloudpickle as cp
from dill import loads
import numpy as np
import jax.numpy as jnp
import torch, yaml, importlib
CONFIG = "x = 1"
pickle_mod = importlib.import_module("pickle")
torch.load("model.pt")
np.load("a.npy", allow_pickle=True)
jnp.load("a.npy", allow_pickle=flag)
yaml.load(open("c.yaml"))
exec(open("configs/default.py").read())
eval(config_text)
with open("x.pkl", "rb") as f:
  pickle.load(f)
'''

SAFE_SNIPPET = '''
import numpy as np, yaml, json
TEMPLATE = "def get_config():\\n  return 1\\n"
np.load("a.npy")
np.load("a.npy", allow_pickle=False, mmap_mode="r")
yaml.load(open("c.yaml"), Loader=yaml.SafeLoader)
exec(TEMPLATE, {})
exec("x = 1")
jax.eval_shape(f)
model.evaluate(batch)
json.load(open("meta.json"))
'''


def test_checker_finds_every_pattern():
  found = findings(UNSAFE_SNIPPET)
  for what in ("import pickle", "import cloudpickle", "from dill", "import_module('pickle')", "torch.load",
               "allow_pickle=True", "allow_pickle=flag", "yaml.load without", "exec(open(", "eval(config_text)", "pickle.load("):
    assert any(what in f for f in found), (what, found)
  assert findings(SAFE_SNIPPET) == []
  # The per-file allowance covers the import only, never loading a file.
  allowed = findings(UNSAFE_SNIPPET, allowed_imports={"pickle"})
  assert not any("import pickle" in f for f in allowed) and any("pickle.load(" in f for f in allowed)


def test_repository_has_no_pickle_or_eval_of_loaded_text():
  files = python_files()
  assert any(f.endswith(os.path.join("recursive_lm", "checkpoint.py")) for f in files)
  assert len(files) > 20, files
  problems = []
  for path in files:
    with open(path, encoding="utf-8") as f:
      source = f.read()
    try:
      rel = os.path.relpath(path, REPO)
      problems += findings(source, rel, ALLOWED_IMPORTS.get(rel, frozenset()))
    except SyntaxError as e:
      pytest.fail(f"{path} does not parse: {e}")
  assert problems == [], "unsafe deserialisation or eval/exec:\n" + "\n".join(problems)
