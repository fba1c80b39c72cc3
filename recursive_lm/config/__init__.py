"""Configuration: every key declared once in `schema` (default, type, doc,
its own checks), the ml_collections defaults generated from it
(`base_config()`), the typed parser for `get_config(arg)` variant strings, and
the frozen, validated view (`schema.Config`) that the rest of the package
reads, built by `validate.load`.

Config files under configs/ call `base_config()`, change what they need and
return it; `load(cfg_dict)` turns the (locked) ConfigDict into `Config`,
rejecting bad values with one line naming the field.

Adding a key is one line: an `option(default, doc, choices=..., check=...)`
field in its dataclass in schema.py (e.g. in `ModelConfig`:
`foo: int = option(0, "what it does (0: off)", check=">= 0")`). The ConfigDict
default, the type check, the value check, config.json and reading older
config.json files (which lack the key and so get its default: make the default
keep the old behaviour) all follow. Only a check that involves another field
goes in validate.py (`when=` covers a check that applies only in some mode).
A key typed in one form and read in another (a string parsed into a tuple)
declares its typed default with `raw=` and gets a resolver in `validate.load`
(see `fields` for the two forms). A new section is a frozen dataclass of
options plus one `section(Cls, doc)` field in its parent.
"""

from recursive_lm.config.defaults import SIZES, base_config, byte_lm, parse_arg
from recursive_lm.config.errors import ConfigError
from recursive_lm.config.schema import (ATTENTION_KERNELS, DENSE_KERNELS, LORA_TARGETS, MESH_RULES, MLP_TYPES,
                                        MOE_DISPATCH, PLAN_PRESETS, REMAT, Config, DataConfig, KernelsConfig, LoraConfig,
                                        MeshConfig, MoEConfig, ModelConfig, MoRConfig, OptimConfig, PlanConfig, RecurrentConfig, TrainConfig,
                                        from_json)
from recursive_lm.config.validate import load

__all__ = ["SIZES", "base_config", "byte_lm", "parse_arg", "ConfigError", "ATTENTION_KERNELS", "DENSE_KERNELS",
           "MOE_DISPATCH", "KernelsConfig", "LORA_TARGETS", "MESH_RULES", "MLP_TYPES",
           "PLAN_PRESETS", "REMAT", "Config", "DataConfig", "LoraConfig", "MeshConfig", "MoEConfig", "ModelConfig", "MoRConfig",
           "OptimConfig", "PlanConfig", "RecurrentConfig", "TrainConfig", "from_json", "load"]
