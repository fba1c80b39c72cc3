"""The machinery that makes the dataclasses of `schema` the one description of
the config: every field is declared once with `option(...)` (its default, a
doc string and the checks that need no other field) or `section(...)` (a
nested dataclass); from that declaration come

  - `config_dict(Config)`: the ml_collections ConfigDict every config file
    starts from (`base_config()`), keys in declaration order;
  - `check_types`: unknown keys (with a did-you-mean), missing keys, replaced
    sections and values of the wrong type, against the declared defaults;
  - `check_values`: the choices and ranges of each field (`when` makes a check
    depend on another field, e.g. MoE sizes only with model.block='moeut');
  - `build`: the frozen Config from a checked ConfigDict;
  - `from_dict`: the Config back from the JSON a run keeps (a key missing
    there, i.e. added after the run was written, reads back as its default).

Raw versus resolved values. The ConfigDict holds what a user types; the Config
holds what the code reads. They are the same for almost every field (a float
field may be typed as an int and is stored as a float). A field whose typed
value is parsed into something else (model.lora.targets "all" -> a tuple of
target names, model.lora.ranks "q=8" -> ((target, rank), ...),
model.head_dim 0 -> d_model // num_heads) declares its ConfigDict default with
`raw=`; `build` then refuses to run unless the caller passes its resolved value
(or its whole section's) in `resolved`, so no raw value reaches the model by
accident. The resolvers live in `validate.py`, next to the cross-field checks.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Iterator

import ml_collections

from recursive_lm.config.errors import ConfigError

_SAME = object()  # raw= not given: the ConfigDict holds the default itself


@dataclasses.dataclass(frozen=True)
class Bound:
  """A range check written as in the error message: '> 0', '>= 0', '(0, 1]'."""
  spec: str

  def holds(self, x) -> bool:
    s = self.spec
    if s.startswith(">="):
      return x >= float(s[2:])
    if s.startswith(">"):
      return x > float(s[1:])
    lo, hi = (float(v) for v in s[1:-1].split(","))
    return (lo < x if s[0] == "(" else lo <= x) and (x < hi if s[-1] == ")" else x <= hi)

  def message(self) -> str:
    return f"must be {self.spec}" if self.spec[0] == ">" else f"must be in {self.spec}"


def option(default: Any, doc: str, *, choices: tuple | None = None, check: str | None = None,
           when: Callable[[Any], bool] | None = None, raw: Any = _SAME) -> Any:
  """One config key: `default` (the value the code reads; its type is the key's
  type), `doc` (one line), `choices` (allowed values) and/or `check` (a range,
  see `Bound`), applied only where `when(root ConfigDict)` holds if given;
  `raw`: the ConfigDict's default when it is parsed into `default`'s form by a
  resolver (see the module doc)."""
  if check is not None:
    Bound(check).holds(0)  # a malformed spec fails at import time
  meta = dict(doc=doc, choices=tuple(choices) if choices is not None else None,
              check=Bound(check) if check else None, when=when, raw=raw)
  return dataclasses.field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
  """A nested group of keys (its own dataclass)."""
  return dataclasses.field(default_factory=cls, metadata=dict(doc=doc, section=cls))


def raw_default(f: dataclasses.Field) -> Any:
  raw = f.metadata.get("raw", _SAME)
  return f.default if raw is _SAME else raw


def is_section(f: dataclasses.Field) -> bool:
  return "section" in f.metadata


def leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
  """(dotted name, field) of every key under `cls`, in declaration order."""
  for f in dataclasses.fields(cls):
    if is_section(f):
      yield from leaves(f.metadata["section"], f"{prefix}{f.name}.")
    else:
      yield f"{prefix}{f.name}", f


def config_dict(cls: type) -> ml_collections.ConfigDict:
  """The ConfigDict of `cls`'s declared (raw) defaults."""
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(cls):
    c[f.name] = config_dict(f.metadata["section"]) if is_section(f) else raw_default(f)
  return c


def check_types(cd, cls: type, prefix: str = "") -> None:
  """Keys and value types of `cd` against the declaration: a config file's typo
  (`c.model.dmodel = 32`) adds a key ConfigDict accepts silently, and None or a
  replaced section gets past ConfigDict's own type checks."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  for key in cd.keys():
    if key not in fields:
      close = difflib.get_close_matches(key, list(fields), n=1)
      hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(sorted(fields))})"
      raise ConfigError(f"config key {prefix}{key} is unknown{hint}")
  missing = [f"{prefix}{key}" for key in fields if key not in cd]
  if missing:
    raise ConfigError(f"config keys missing: {', '.join(missing)} (was {prefix.rstrip('.') or 'the config'} "
                      "replaced by a dict without them?)")
  for key, f in fields.items():
    value = cd[key]
    if is_section(f):
      if not hasattr(value, "keys"):
        raise ConfigError(f"{prefix}{key}={value!r} must be a section like the default")
      check_types(value, f.metadata["section"], f"{prefix}{key}.")
      continue
    default = raw_default(f)
    kind = type(default)
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) or (
        kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
      raise ConfigError(f"{prefix}{key}={value!r} must be a{'n' if kind is int else ''} {kind.__name__} "
                        f"(default {default!r})")


def _get(cd, dotted: str):
  for part in dotted.split("."):
    cd = cd[part]
  return cd


def check_values(cd, cls: type) -> None:
  """The declared choices and ranges of every key (after `check_types`); the
  error line names the key, its value, the rule and the key's doc."""
  for name, f in leaves(cls):
    choices, bound, when = f.metadata["choices"], f.metadata["check"], f.metadata["when"]
    if (choices is None and bound is None) or (when is not None and not when(cd)):
      continue
    value, doc = _get(cd, name), f" ({f.metadata['doc']})"  # the message says what the key is for
    if choices is not None and value not in choices:
      raise ConfigError(f"{name}={value!r} is not one of {list(choices)}{doc}")
    if bound is not None and not bound.holds(value):
      raise ConfigError(f"{name}={value} {bound.message()}{doc}")


def _resolved_value(f: dataclasses.Field, value):
  kind = type(f.default)
  if kind is float:
    return float(value)
  if kind is bool:
    return bool(value)
  return value


def build(cls: type, cd, resolved: dict[str, Any], prefix: str = ""):
  """The frozen `cls` from a checked ConfigDict; `resolved` maps dotted names
  (a key or a whole section) to the values their resolvers computed, and must
  cover every key declared with raw=."""
  kwargs = {}
  for f in dataclasses.fields(cls):
    name = f"{prefix}{f.name}"
    if name in resolved:
      kwargs[f.name] = resolved[name]
    elif is_section(f):
      kwargs[f.name] = build(f.metadata["section"], cd[f.name], resolved, f"{name}.")
    elif f.metadata.get("raw", _SAME) is not _SAME:
      raise TypeError(f"config key {name} is declared with raw= but no resolved value was given")
    else:
      kwargs[f.name] = _resolved_value(f, cd[f.name])
  return cls(**kwargs)


def _tuples(x):
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def from_dict(cls: type, raw: dict, prefix: str = ""):
  """`cls` from its `dataclasses.asdict` JSON form (lists back to tuples); keys
  the JSON lacks take their declared defaults, unknown keys are errors."""
  if not isinstance(raw, dict):
    raise TypeError(f"{prefix.rstrip('.') or 'the config'} is a {type(raw).__name__}, not an object")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - set(fields))
  if unknown:
    raise KeyError(f"unknown keys {[prefix + k for k in unknown]}")
  kwargs = {}
  for name, value in raw.items():
    f = fields[name]
    kwargs[name] = from_dict(f.metadata["section"], value, f"{prefix}{name}.") if is_section(f) else _tuples(value)
  return cls(**kwargs)
