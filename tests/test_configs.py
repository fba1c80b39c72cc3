"""Every file in configs/ loads (default and tiny variants), validates, and
builds a model shape-only; variant strings are typed and checked."""

import glob
import importlib.util
import os

import jax
import pytest
from flax import nnx

from recursive_lm import config as config_lib
from recursive_lm.analysis import accounting
from recursive_lm.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
IDS = [os.path.basename(f)[:-3] for f in CONFIG_FILES]


def load_module(path):
  # The same loading config_flags does: a file, not a package import. An
  # ImportError here (a config needing code that is not there) fails the test.
  spec = importlib.util.spec_from_file_location(f"config_under_test_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_files_found():
  assert {"default", "vanilla", "recursive", "relaxed", "sandwich", "middle", "looped"} <= set(IDS)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=IDS)
def test_docstring_starts_with_the_command(path):
  doc = (load_module(path).__doc__ or "").strip()
  head = doc.split("\n\n")[:2]
  assert doc and any("python -m recursive_lm." in part for part in head), f"{path}: docstring must give the command"


@pytest.mark.parametrize("arg", [None, "size=tiny"])
@pytest.mark.parametrize("path", CONFIG_FILES, ids=IDS)
def test_config_loads_and_builds(path, arg):
  cd = load_module(path).get_config(arg)
  cfg = config_lib.load(cd)
  model = accounting.abstract_model(cfg)  # nnx.eval_shape: shapes only
  counts = accounting.count_params(model)
  assert counts["total_params"] > 0
  assert model.plan.depth == cfg.model.plan.num_layers
  graphdef, state = nnx.split(model)
  assert all(hasattr(x, "shape") for x in jax.tree.leaves(state))
  if arg == "size=tiny":  # trains on CPU in seconds
    assert cfg.train.steps <= 50 and cfg.model.d_model <= 64 and cfg.data.seq_len <= 64, (path, cfg.train.steps)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=IDS)
def test_unknown_variant_key_and_bad_size_are_config_errors(path):
  module = load_module(path)
  with pytest.raises(ConfigError, match="no_such_key"):
    module.get_config("size=tiny,no_such_key=1")
  with pytest.raises(ConfigError, match="size"):
    config_lib.load(module.get_config("size=enormous"))
  with pytest.raises(ConfigError):
    module.get_config("size")  # not key=value


@pytest.mark.parametrize("name,arg", [
    ("recursive", "repeats=two"),
    ("recursive", "order=zigzag"),
    ("looped", "per_depth_norms=maybe"),
    ("middle", "num_layers=4.5"),
    ("relaxed", "lora_rank=eight"),
])
def test_bad_variant_value_is_config_error(name, arg):
  module = load_module(os.path.join(REPO, "configs", f"{name}.py"))
  with pytest.raises(ConfigError):
    module.get_config(arg)


def test_typed_variants_reach_the_config():
  rec = load_module(os.path.join(REPO, "configs", "recursive.py"))
  cfg = config_lib.load(rec.get_config("size=tiny,order=sequence,repeats=3,num_layers=6,lora_rank=2"))
  p = cfg.model.plan
  assert (p.preset, p.num_layers, p.repeats, cfg.model.lora.rank) == ("sequence", 6, 3, 2)
  mid = load_module(os.path.join(REPO, "configs", "middle.py"))
  assert config_lib.load(mid.get_config("order=sequence")).model.plan.preset == "middle_sequence"
  for name in ("moeut", "moeut_dense"):  # accel=1: the device benchmark's bf16 + remat setting
    cfg = config_lib.load(load_module(os.path.join(REPO, "configs", f"{name}.py")).get_config("size=244m,accel=1"))
    assert (cfg.model.compute_dtype, cfg.model.remat, cfg.data.batch_size, cfg.optim.grad_accum) == \
        ("bfloat16", "dots", 64, 4)
  # A variant that breaks the plan is caught by load() with the plan's own message.
  with pytest.raises(ConfigError, match="model.plan"):
    config_lib.load(rec.get_config("repeats=4"))  # 6 layers, 4 repeats
