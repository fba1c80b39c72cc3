"""The config declared once (recursive_lm/config/fields.py, schema.py): the
ConfigDict defaults, the checks and the JSON round trip all come from the
dataclass declarations, and the default job's config.json is what it was
before the declarations replaced the hand-written defaults/schema/validation."""

import dataclasses
import importlib.util
import json
import os

import ml_collections
import pytest

from recursive_lm import config as config_lib
from recursive_lm.config import ConfigError, fields
from recursive_lm.config.fields import option, section

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "data", "default_job_config.json")


def _default_job():
  spec = importlib.util.spec_from_file_location("default_job_config", os.path.join(REPO, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def test_default_job_config_json_is_unchanged():
  """Every key of the default job's config.json as written before the declarations (tests/data golden) keeps
  its value; keys added since are not in the golden and must hold their declared defaults."""
  new = _flat(json.loads(config_lib.load(_default_job()).to_json()))
  old = _flat(json.load(open(GOLDEN)))
  assert {k: new.get(k, "<missing>") for k in old} == old
  declared = {name: f.default for name, f in fields.leaves(config_lib.Config)}
  for key in set(new) - set(old):
    value = new[key]
    assert (tuple(value) if isinstance(value, list) else value) == declared[key], key


def test_every_key_is_declared_with_a_doc_and_its_default_passes_its_own_checks():
  names = []
  for name, f in fields.leaves(config_lib.Config):
    names.append(name)
    assert f.metadata["doc"].strip(), name
    raw = fields.raw_default(f)
    if f.metadata["choices"] is not None:
      assert raw in f.metadata["choices"], name
    if f.metadata["check"] is not None and f.metadata["when"] is None:
      assert f.metadata["check"].holds(raw), name
  assert len(names) == len(set(names)) > 100
  # base_config() is the declaration: the same keys, the typed (raw) defaults.
  flat = _flat(config_lib.base_config().to_dict())
  assert sorted(flat) == sorted(names)
  assert flat["model.lora.targets"] == "all" and flat["model.lora.ranks"] == "" and flat["model.head_dim"] == 0


def test_raw_keys_are_resolved():
  cfg = config_lib.load(config_lib.base_config())
  assert cfg.model.head_dim == 128 // 4
  assert cfg.model.lora.targets == config_lib.LORA_TARGETS and cfg.model.lora.ranks == ()
  cd = config_lib.base_config()
  cd.model.mlp_type, cd.model.lora.rank, cd.model.lora.ranks = "gelu", 2, "q=4"
  lora = config_lib.load(cd).model.lora
  assert "gate" not in lora.targets and lora.rank_of("q") == 4 and lora.rank_of("down") == 2


# A toy schema: what adding a key or a section takes (one line each), end to end.
@dataclasses.dataclass(frozen=True)
class _Inner:
  width: int = option(8, "a width", check="> 0")
  mode: str = option("a", "a mode", choices=("a", "b"))
  names: tuple = option(("x", "y"), "parsed from a comma list", raw="x,y")


@dataclasses.dataclass(frozen=True)
class _Toy:
  rate: float = option(0.5, "a fraction", check="(0, 1]")
  size: int = option(0, "only checked in mode b", check="> 0", when=lambda c: c.inner.mode == "b")
  inner: _Inner = section(_Inner, "a section")


def _toy_cd(**inner):
  cd = fields.config_dict(_Toy)
  for k, v in inner.items():
    cd.inner[k] = v
  return cd


def test_a_declared_key_gets_its_default_type_check_value_check_and_json():
  cd = fields.config_dict(_Toy)
  assert cd.to_dict() == {"rate": 0.5, "size": 0, "inner": {"width": 8, "mode": "a", "names": "x,y"}}
  fields.check_types(cd, _Toy)
  fields.check_values(cd, _Toy)  # size=0 passes: its check applies only in mode b
  with pytest.raises(ConfigError, match=r"^size=0 must be > 0 \(only checked in mode b\)$"):
    fields.check_values(_toy_cd(mode="b"), _Toy)
  with pytest.raises(ConfigError, match=r"^inner.mode='c' is not one of \['a', 'b'\] \(a mode\)$"):
    fields.check_values(_toy_cd(mode="c"), _Toy)
  cd = _toy_cd()
  cd.rate = 1.5
  with pytest.raises(ConfigError, match=r"^rate=1.5 must be in \(0, 1\] \(a fraction\)$"):
    fields.check_values(cd, _Toy)
  bad = ml_collections.ConfigDict({"rate": 0.5, "size": 0, "inner": {"width": 8, "mode": "a", "namez": "x"}})
  with pytest.raises(ConfigError, match="config key inner.namez is unknown .did you mean inner.names"):
    fields.check_types(bad, _Toy)
  # A raw key reaches the dataclass only through its resolver.
  with pytest.raises(TypeError, match="inner.names is declared with raw="):
    fields.build(_Toy, fields.config_dict(_Toy), resolved={})
  toy = fields.build(_Toy, fields.config_dict(_Toy), resolved={"inner.names": ("x", "y")})
  assert toy == _Toy()
  back = fields.from_dict(_Toy, json.loads(json.dumps(dataclasses.asdict(toy))))
  assert back == toy and isinstance(back.inner.names, tuple)
  assert fields.from_dict(_Toy, {"inner": {"mode": "b"}}) == _Toy(inner=_Inner(mode="b"))  # missing: defaults


@pytest.mark.parametrize("text", ["{}", "[]", '{"seed": 0}', "not json"])
def test_a_file_that_is_not_a_config_is_refused(text):
  with pytest.raises(ConfigError, match="^config.json: not a recursive_lm config"):
    config_lib.from_json(text)


def test_an_unknown_key_in_config_json_is_refused():
  raw = json.loads(config_lib.load(config_lib.base_config()).to_json())
  raw["model"]["dmodel"] = 3
  with pytest.raises(ConfigError, match="model.dmodel"):
    config_lib.from_json(json.dumps(raw))
