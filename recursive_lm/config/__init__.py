"""Configuration: the ml_collections defaults every config file starts from
(`defaults`), the typed parser for `get_config(arg)` variant strings, and the
frozen, validated view (`schema.Config`) that the rest of the package reads,
built by `validate.load`.

Config files under configs/ call `base_config()`, change what they need and
return it; `load(cfg_dict)` turns the (locked) ConfigDict into `Config`,
rejecting bad values with one line naming the field.
"""

from recursive_lm.config.defaults import SIZES, base_config, byte_lm, parse_arg
from recursive_lm.config.errors import ConfigError
from recursive_lm.config.schema import (ATTENTION_KERNELS, DENSE_KERNELS, LORA_TARGETS, MESH_RULES, MLP_TYPES,
                                        PLAN_PRESETS, REMAT, Config, DataConfig, KernelsConfig, LoraConfig, MeshConfig,
                                        MoEConfig, ModelConfig, MoRConfig, OptimConfig, PlanConfig, RecurrentConfig,
                                        TrainConfig,
                                        from_json)
from recursive_lm.config.validate import load

__all__ = ["SIZES", "base_config", "byte_lm", "parse_arg", "ConfigError", "ATTENTION_KERNELS", "DENSE_KERNELS",
           "KernelsConfig", "LORA_TARGETS", "MESH_RULES", "MLP_TYPES",
           "PLAN_PRESETS", "REMAT", "Config", "DataConfig", "LoraConfig", "MeshConfig", "MoEConfig", "ModelConfig", "MoRConfig",
           "OptimConfig", "PlanConfig", "RecurrentConfig", "TrainConfig", "from_json", "load"]
