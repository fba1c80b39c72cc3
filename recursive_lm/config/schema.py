"""The frozen, typed view of a validated config (`Config` and its parts), the
allowed values of its choice fields, and `from_json` for the copy a run keeps
in config.json."""

from __future__ import annotations

import dataclasses
import json

from recursive_lm.config.errors import ConfigError
from recursive_lm import plan as plan_lib


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  preset: str
  num_layers: int
  repeats: int
  per_depth_norms: bool
  prelude: int = 2  # recurrent only
  coda: int = 2  # recurrent only


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
  """Recurrent depth (preset 'recurrent'): see recursive_lm.model.recurrent."""
  injection: str = "concat"
  init_state: str = "normal"
  backprop_depth: int = 8
  sample: str = "fixed"
  mean: float = 0.0
  sigma: float = 0.5
  min_loops: int = 1
  max_loops: int = 32


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int
  targets: tuple[str, ...]
  ranks: tuple[tuple[str, int], ...]  # resolved rank per target (0 = no adapter)
  alpha: float

  def rank_of(self, target: str) -> int:
    return dict(self.ranks).get(target, 0)

  def scale_of(self, target: str) -> float:
    r = self.rank_of(target)
    return (self.alpha if self.alpha > 0 else r) / r if r else 0.0


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  experts: int = 0
  expert_size: int = 128
  top_k: int = 8
  att_experts: int = 8
  att_top_k: int = 2
  mlp_balance: float = 0.01
  att_balance: float = 0.001
  norm_style: str = "peri"
  dispatch: str = "auto"
  block_rows: int = 512


@dataclasses.dataclass(frozen=True)
class KernelsConfig:
  """Kernel choices (recursive_lm.model.kernels): auto picks per backend."""
  attention: str = "auto"
  dense: str = "auto"
  decode: str = "auto"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  mlp_type: str
  norm: str
  norm_eps: float
  rope_base: float
  rope_fraction: float
  tie_embeddings: bool
  max_seq_len: int
  param_dtype: str
  compute_dtype: str
  remat: str
  scan: bool
  plan: PlanConfig
  lora: LoraConfig
  block: str = "dense"
  moe: MoEConfig = MoEConfig()
  sliding_window: int = 0
  global_every: int = 0
  rope_base_local: float = 0.0
  post_norms: bool = False
  qk_norm: bool = False
  scale_embeddings: bool = False
  norm_offset: float = 0.0
  query_pre_attn_scalar: float = 0.0
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  kv_sharing: str = "none"  # see recursive_lm.plan.kv_sources
  kernels: KernelsConfig = KernelsConfig()
  recurrent: RecurrentConfig = RecurrentConfig()


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str
  glob: str
  tokens_path: str
  tokenizer: str
  max_bytes: int
  val_fraction: float
  seq_len: int
  batch_size: int
  num_threads: int
  prefetch: int
  task: str = "parity"
  train_lengths: str = "1-8"
  eval_lengths: str = "9-16"
  hops: int = 2


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float
  schedule: str
  warmup_steps: int
  final_lr_fraction: float
  decay_fraction: float
  weight_decay: float
  decay_lora: bool
  b1: float
  b2: float
  eps: float
  clip_norm: float
  grad_accum: int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int
  log_every: int
  eval_every: int
  eval_batches: int
  checkpoint_every: int
  keep_checkpoints: int
  on_nonfinite: str
  peak_flops: float


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int
  fsdp: int
  tensor: int
  expert: int
  rules: str
  distributed: bool


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int
  model: ModelConfig
  data: DataConfig
  optim: OptimConfig
  train: TrainConfig
  mesh: MeshConfig

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
PLAN_PRESETS = plan_lib.PRESET_NAMES
MLP_TYPES = ("swiglu", "geglu", "gelu", "relu")
REMAT = ("none", "full", "dots", "dots_no_batch", "nested")
MESH_RULES = ("replicated", "data", "fsdp", "fsdp_tensor", "fsdp_tensor_expert")
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash", "blocked")
DENSE_KERNELS = ("auto", "custom_vjp", "xla")
DECODE_KERNELS = ("auto", "single", "masked")
INJECTIONS = ("concat", "add", "parcae")
INIT_STATES = ("normal", "zeros", "prelude")
LOOP_SAMPLES = ("fixed", "poisson_lognormal", "uniform")


def from_json(text: str, where: str = "config.json") -> Config:
  """Rebuild a Config from `Config.to_json()` (used by checkpoints); a file
  that is not such a config raises ConfigError naming `where`."""
  try:
    return _from_raw(json.loads(text))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConfigError(f"{where}: not a recursive_lm config ({type(e).__name__}: {e})") from None


def _from_raw(raw: dict) -> Config:
  raw["model"]["plan"] = PlanConfig(**raw["model"]["plan"])
  if "moe" in raw["model"]:
    raw["model"]["moe"] = MoEConfig(**raw["model"]["moe"])
  if "kernels" in raw["model"]:
    raw["model"]["kernels"] = KernelsConfig(**raw["model"]["kernels"])
  if "recurrent" in raw["model"]:
    raw["model"]["recurrent"] = RecurrentConfig(**raw["model"]["recurrent"])
  lo = raw["model"]["lora"]
  raw["model"]["lora"] = LoraConfig(rank=lo["rank"], targets=tuple(lo["targets"]),
                                    ranks=tuple(tuple(x) for x in lo["ranks"]), alpha=lo["alpha"])
  return Config(seed=raw["seed"], model=ModelConfig(**raw["model"]), data=DataConfig(**raw["data"]),
                optim=OptimConfig(**raw["optim"]), train=TrainConfig(**raw["train"]), mesh=MeshConfig(**raw["mesh"]))
