"""Every config key, declared once: its default, type, doc string and the
checks that need no other field (`fields.option`), grouped in the frozen
dataclasses the rest of the package reads (`Config` and its parts). The
ConfigDict defaults (`base_config()`), the key/type/value checks and the JSON
round trip (`from_json`) are generated from these declarations; see the
package doc for how to add a key. Checks between fields are in validate.py.
"""

from __future__ import annotations

import dataclasses
import json

from recursive_lm import plan as plan_lib
from recursive_lm.config import fields as F
from recursive_lm.config import tasks
from recursive_lm.config.errors import ConfigError
from recursive_lm.config.fields import option, section

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
PLAN_PRESETS = plan_lib.PRESET_NAMES
MLP_TYPES = ("swiglu", "geglu", "gelu", "relu")
NORMS = ("rms", "layer")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots", "dots_no_batch", "nested")
ROPE_SCALING = ("none", "linear", "llama3")
BLOCKS = ("dense", "moeut")
MESH_RULES = ("replicated", "data", "fsdp", "fsdp_tensor", "fsdp_tensor_expert")
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash", "blocked")
DENSE_KERNELS = ("auto", "custom_vjp", "xla")
DECODE_KERNELS = ("auto", "single", "masked")
MOE_NORM_STYLES = ("peri", "pre")
MOE_DISPATCH = ("auto", "loop", "blocks", "ragged", "megablox", "ragged_mgpu", "dense")
INJECTIONS = ("concat", "add", "parcae")
INIT_STATES = ("normal", "zeros", "prelude")
LOOP_SAMPLES = ("fixed", "poisson_lognormal", "uniform")
CURRICULA = ("none", "linear", "1-sqrt")
MOR_ROUTINGS = ("none", "expert", "token")
MOR_WEIGHTINGS = ("scaled", "unit")
MOR_EXECUTIONS = ("gather", "mask")
SOURCES = ("stdlib", "text", "jsonl", "parquet", "arrayrecord", "tokens", "synthetic")
DECODE_ERRORS = ("replace", "refuse")
SCHEDULES = ("cosine", "wsd", "constant")
ON_NONFINITE = ("stop", "skip")


def _moeut(c) -> bool:
  return c.model.block == "moeut"


def _rope_scaled(c) -> bool:
  return c.model.rope_scaling != "none"


def _llama3(c) -> bool:
  return c.model.rope_scaling == "llama3"


@dataclasses.dataclass(frozen=True)
class KernelsConfig:
  """Kernel choices (recursive_lm/model/kernels.py). auto: blocked + custom_vjp on CPU, cudnn + xla on GPU,
  splash + xla on TPU; a kernel the backend cannot run is an error when the model is built."""
  attention: str = option("auto", "attention kernel", choices=ATTENTION_KERNELS)
  dense: str = option("auto", "dense matmul: custom_vjp (hand-written backward) or xla (x @ W with autodiff)",
                      choices=DENSE_KERNELS)
  decode: str = option("auto", "decode attention: auto (= single) | single (one query over the cache, window-only "
                       "reads) | masked (the full attention path)", choices=DECODE_KERNELS)


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  """The depth plan (recursive_lm/plan.py)."""
  preset: str = option("vanilla", "how blocks are shared over depth", choices=PLAN_PRESETS)
  num_layers: int = option(4, "effective depth (recurrent: prelude + core blocks * repeats + coda)", check="> 0")
  repeats: int = option(1, "loops of the shared stage (ignored by vanilla; looped/sandwich repeat the shared block)",
                        check="> 0")
  per_depth_norms: bool = option(False, "shared blocks keep their own norms at each depth")
  prelude: int = option(2, "recurrent only: unique blocks before the looped core")
  coda: int = option(2, "recurrent only: unique blocks after it")


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
  """Recurrent depth (preset 'recurrent', Huginn; recursive_lm/model/recurrent.py): how each core iteration
  sees the prelude output e, and how many iterations run. Read only by that preset, checked always."""
  injection: str = option("concat", "concat: Linear(2D -> D)([s; e]); add: s + e; parcae: diagonal contractive decay",
                          choices=INJECTIONS)
  init_state: str = option("normal", "normal (Huginn: std sqrt(2 / 5D)), zeros, or prelude (the prelude output e)",
                           choices=INIT_STATES)
  backprop_depth: int = option(8, "k: only the last k core iterations are differentiated", check="> 0")
  sample: str = option("fixed", "loop count per train step (fixed: plan.repeats)", choices=LOOP_SAMPLES)
  mean: float = option(0.0, "poisson_lognormal: mean loop count r-bar (0: plan.repeats)", check=">= 0")
  sigma: float = option(0.5, "poisson_lognormal: std of the log-normal rate", check="> 0")
  min_loops: int = option(1, "uniform: loop counts in [min_loops, max_loops]; both sampled kinds clip to it",
                          check="> 0")
  max_loops: int = option(32, "see min_loops")
  curriculum: str = option("none", "loop-count curriculum: the mean r-bar rises from min_loops to `mean` (fixed: "
                           "plan.repeats) over the first curriculum_steps steps (model.recurrent.curriculum_mean)",
                           choices=CURRICULA)
  curriculum_steps: int = option(0, "steps the curriculum's rise spans", check="> 0",
                                 when=lambda c: c.model.recurrent.curriculum != "none")
  per_sequence: bool = option(False, "True: every row of a batch draws its own loop count (else one per step)")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Per-depth LoRA relaxation of shared blocks. `targets` and `ranks` are typed as strings and resolved
  by validate.load (which targets exist depends on model.mlp_type)."""
  rank: int = option(0, "rank of every target (0: strict tying)", check=">= 0")
  targets: tuple[str, ...] = option(LORA_TARGETS, "all: every projection the block has; or a list such as 'q,v,down'",
                                    raw="all")
  ranks: tuple[tuple[str, int], ...] = option(
      (), "per-target override such as 'q=8,down=16'; resolved: (target, rank) of every adapter", raw="")
  alpha: float = option(0.0, "LoRA alpha (0: alpha = rank, scale 1)")

  def rank_of(self, target: str) -> int:
    return dict(self.ranks).get(target, 0)

  def scale_of(self, target: str) -> float:
    r = self.rank_of(target)
    return (self.alpha if self.alpha > 0 else r) / r if r else 0.0


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """MoEUT blocks (SwitchHead + sigma-MoE); read only when model.block == 'moeut'."""
  experts: int = option(0, "sigma-MoE experts per unique block", check="> 0", when=_moeut)
  expert_size: int = option(128, "hidden units per expert", check="> 0", when=_moeut)
  top_k: int = option(8, "experts each token uses")
  att_experts: int = option(8, "SwitchHead experts per head (1: plain V, sigmoid-gated O)", check="> 0", when=_moeut)
  att_top_k: int = option(2, "SwitchHead experts each token uses")
  mlp_balance: float = option(0.01, "entropy regulariser coefficient of the MLP router", check=">= 0", when=_moeut)
  att_balance: float = option(0.001, "entropy regulariser coefficient of the attention router", check=">= 0",
                              when=_moeut)
  norm_style: str = option("peri", "layer-norm placement", choices=MOE_NORM_STYLES)
  dispatch: str = option("auto", "expert dispatch (auto: loop on CPU, blocks on GPU, megablox on TPU; ragged_mgpu: Hopper GPUs)",
                         choices=MOE_DISPATCH)
  block_rows: int = option(512, "largest rows per expert block of the loop dispatch (sigma-MoE: tiers down to 32)")


@dataclasses.dataclass(frozen=True)
class MoRConfig:
  """Mixture-of-Recursions (recursive_lm/model/mor.py): routers choose how many recursions of the plan's one
  repeated stage (cycle order) each token takes; generation routes each token causally (mor.run_causal).
  `capacities` is typed as a string and resolved by validate.load to one value per recursion step (empty when off)."""
  routing: str = option("none", "none | expert (a router per step, top-k of the sequence) | token (a depth per token)",
                        choices=MOR_ROUTINGS)
  capacities: tuple[float, ...] = option(
      (), "share of a row's tokens per recursion step, e.g. '1,0.5,0.25' (empty: (R-i)/R for step i)", raw="")
  weighting: str = option("scaled", "scaled: h + s*g*(f(h) - h) | unit: f(h), straight-through gradient to the router",
                          choices=MOR_WEIGHTINGS)
  router_scale: float = option(0.1, "s of the scaled update", check="> 0")
  bce_coef: float = option(0.001, "expert routing: weight of the routers' binary cross-entropy", check=">= 0")
  balance_coef: float = option(0.1, "token routing: weight of the depth balance loss", check=">= 0")
  execution: str = option("gather", "gather: a step runs on its k tokens only | mask: all tokens, masked (reference)",
                          choices=MOR_EXECUTIONS)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = option(256, "token ids", check="> 0")
  d_model: int = option(128, "residual stream width", check="> 0")
  num_heads: int = option(4, "query heads", check="> 0")
  num_kv_heads: int = option(4, "key/value heads (grouped-query attention below num_heads)", check="> 0")
  head_dim: int = option(0, "per-head width (typed 0: d_model // num_heads)", check=">= 0", raw=0)
  mlp_dim: int = option(384, "MLP hidden width", check="> 0")
  mlp_type: str = option("swiglu", "MLP kind", choices=MLP_TYPES)
  norm: str = option("rms", "norm kind", choices=NORMS)
  norm_eps: float = option(1e-6, "norm epsilon")
  rope_base: float = option(10000.0, "rotary base")
  rope_fraction: float = option(1.0, "share of each head's dims that rotate")
  sliding_window: int = option(0, ">0: local layers attend to this many past positions", check=">= 0")
  global_every: int = option(0, "with sliding_window: every Nth effective layer is global (0: none)", check=">= 0")
  rope_base_local: float = option(0.0, "rotary base of the local layers (0: model.rope_base)", check=">= 0")
  reembed_tau: float = option(0.0, "loop re-embedding (Grokked transformers): at the start of every loop after the "
                              "first, h <- h + softmax(tau h E^T) E with the embedding table E (0: off)", check=">= 0")
  kv_sharing: str = option("none", "which layers share K/V, one KV-cache entry per distinct slot: none | cla:<s> "
                           "(groups of s adjacent layers) | mlkv:<n> (n KV layers over the depth) | recursion "
                           "(later repeats read the first repeat's); see recursive_lm.plan.kv_sources")
  post_norms: bool = option(False, "sandwich norms: normalise the attention and MLP outputs before the residual add "
                            "(Gemma 2/3)")
  qk_norm: bool = option(False, "per-head RMS/LayerNorm of queries and keys before rotary (Gemma 3, Qwen 3)")
  scale_embeddings: bool = option(False, "multiply the embedding output by sqrt(d_model) (Gemma; the tied head is "
                                  "unscaled)")
  norm_offset: float = option(0.0, "0: norm scale w; 1: stored w with effective scale 1 + w (Gemma)",
                              choices=(0.0, 1.0))
  query_pre_attn_scalar: float = option(0.0, "queries scaled by this ** -0.5 (0: head_dim)", check=">= 0")
  rope_scaling: str = option("none", "applies to the global rotary base only", choices=ROPE_SCALING)
  rope_scaling_factor: float = option(1.0, "rotary scaling factor", check="> 0", when=_rope_scaled)
  rope_low_freq_factor: float = option(1.0, "llama3 only")
  rope_high_freq_factor: float = option(4.0, "llama3 only")
  rope_original_max_len: int = option(8192, "llama3 only: the context the base model was trained at", check="> 0",
                                      when=_llama3)
  tie_embeddings: bool = option(True, "the output head reads the embedding table")
  max_seq_len: int = option(2048, "longest sequence (rotary table, KV cache)", check="> 0")
  param_dtype: str = option("float32", "dtype of the stored parameters", choices=DTYPES)
  compute_dtype: str = option("float32", "dtype of the activations", choices=DTYPES)
  remat: str = option("none", "rematerialisation policy (nested: two-level, memory ~ R, not K*R)", choices=REMAT)
  scan: bool = option(True, "False: unrolled Python loop over the depth (the reference)")
  kernels: KernelsConfig = section(KernelsConfig, "kernel choices")
  plan: PlanConfig = section(PlanConfig, "the depth plan")
  recurrent: RecurrentConfig = section(RecurrentConfig, "recurrent depth (preset 'recurrent')")
  lora: LoraConfig = section(LoraConfig, "per-depth LoRA")
  block: str = option("dense", "dense, or moeut (SwitchHead + sigma-MoE, peri-layernorm)", choices=BLOCKS)
  moe: MoEConfig = section(MoEConfig, "MoEUT sizes (model.block='moeut')")
  mor: MoRConfig = section(MoRConfig, "Mixture-of-Recursions routers")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = option("stdlib", "where the training text comes from", choices=SOURCES)
  glob: str = option("", "text/jsonl/parquet/arrayrecord: glob of the corpus files (** recursive)")
  text_field: str = option("text", "jsonl: the field, parquet: the column holding each document's text")
  decode_errors: str = option("replace", "documents that are not UTF-8: replace bad bytes with U+FFFD (counted) "
                              "or refuse them (an error naming file and line)", choices=DECODE_ERRORS)
  tokens_path: str = option("", "tokens: directory written by recursive_lm.data.prepare")
  tokenizer: str = option("byte", "byte | sentencepiece:PATH | hf:PATH")
  mixture: str = option("", "several sources with weights, 'SOURCE:LOCATION=WEIGHT;...' (LOCATION: the glob, or the "
                        "tokens directory; stdlib: empty), e.g. 'tokens:data/web=0.7;jsonl:code/*.jsonl=0.3'; the "
                        "other data keys apply to each; eval losses per source as eval_loss/mixI ('' off)")
  max_bytes: int = option(0, "stdlib/text/jsonl/parquet/arrayrecord: cap on corpus bytes read (0: all)",
                          check=">= 0")
  val_fraction: float = option(0.05, "share of the corpus held out for evaluation", check="(0, 1)")
  seq_len: int = option(128, "tokens per training row", check="> 0")
  batch_size: int = option(16, "rows per step (all devices)", check="> 0")
  num_threads: int = option(2, "grain worker threads")
  prefetch: int = option(4, "grain prefetch buffer")
  task: str = option("parity", "synthetic task (recursive_lm/data/synthetic.py)", choices=tasks.TASKS)
  train_lengths: str = option("1-8", "synthetic: lengths trained on ('1-8' or '1,2,5')")
  eval_lengths: str = option("9-16", "synthetic: held-out lengths reported by evaluate")
  hops: int = option(2, "synthetic induction: p of p-hop", check="> 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = option(3e-3, "peak learning rate", check="> 0")
  schedule: str = option("cosine", "learning-rate schedule", choices=SCHEDULES)
  warmup_steps: int = option(50, "linear warm-up steps", check=">= 0")
  final_lr_fraction: float = option(0.1, "last learning rate / peak", check="[0, 1]")
  decay_fraction: float = option(0.2, "wsd: share of steps spent decaying", check="(0, 1]")
  weight_decay: float = option(0.1, "AdamW weight decay", check=">= 0")
  decay_lora: bool = option(False, "apply weight decay to LoRA factors too")
  b1: float = option(0.9, "Adam beta1", check="[0, 1)")
  b2: float = option(0.95, "Adam beta2", check="[0, 1)")
  eps: float = option(1e-8, "Adam epsilon", check=">= 0")
  clip_norm: float = option(1.0, "global gradient-norm clip (0: none)", check=">= 0")
  grad_accum: int = option(1, "k > 1: data.batch_size rows as k micro-batches, then one update", check="> 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = option(200, "optimiser steps", check="> 0")
  log_every: int = option(10, "steps between metric lines", check="> 0")
  eval_every: int = option(100, "steps between evaluations", check="> 0")
  eval_batches: int = option(8, "batches per evaluation", check="> 0")
  checkpoint_every: int = option(100, "steps between checkpoints", check="> 0")
  keep_checkpoints: int = option(2, "newest checkpoints kept", check="> 0")
  on_nonfinite: str = option("stop", "a non-finite loss, gradient or norm: stop the run or skip the update",
                             choices=ON_NONFINITE)
  peak_flops: float = option(0.0, "per device FLOP/s for MFU; 0: known table or measured matmul peak", check=">= 0")
  exit_loss_weights: tuple[float, ...] = option(
      (), "per-loop readout losses for early exit, e.g. '0.25,0.25,0.5,1': one weight per loop of the repeated "
      "stage, the last for the model's output ('' off; logged as loss_loop_j); resolved: the weights", raw="")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = option(-1, "data-parallel devices (-1: all remaining devices)")
  fsdp: int = option(1, "parameter-sharding devices (-1: the rest)")
  tensor: int = option(1, "tensor-parallel devices (-1: the rest)")
  expert: int = option(1, "expert-parallel devices (-1: the rest)")
  rules: str = option("fsdp", "logical-axis -> mesh-axis table (recursive_lm/sharding.py)", choices=MESH_RULES)
  distributed: bool = option(False, "call jax.distributed.initialize")


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = option(0, "seed of the parameters, data order and sampling")
  model: ModelConfig = section(ModelConfig, "the network")
  data: DataConfig = section(DataConfig, "the data pipeline")
  optim: OptimConfig = section(OptimConfig, "the optimiser and its schedule")
  train: TrainConfig = section(TrainConfig, "the training loop")
  mesh: MeshConfig = section(MeshConfig, "the device mesh")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def from_json(text: str, where: str = "config.json") -> Config:
  """Rebuild a Config from `Config.to_json()` (used by checkpoints). Keys the
  file lacks (added after it was written) read back as their defaults; a file
  that is not such a config raises ConfigError naming `where`."""
  try:
    raw = json.loads(text)
    missing = [f.name for f in dataclasses.fields(Config) if not isinstance(raw, dict) or f.name not in raw]
    if missing:
      raise KeyError(f"missing {missing}")
    return F.from_dict(Config, raw)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConfigError(f"{where}: not a recursive_lm config ({type(e).__name__}: {e})") from None
