"""Configuration: the ml_collections defaults every config file starts from, the
typed parser for `get_config(arg)` variant strings, and the frozen, validated
view (`Config`) that the rest of the package reads.

Config files under configs/ call `base_config()`, change what they need and
return it; `load(cfg_dict)` turns the (locked) ConfigDict into `Config`,
rejecting bad values with one line naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and the values."""


# ----------------------------------------------------------------------------
# Defaults (the full key set: an override of a key not listed here is an error).


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 256
  m.d_model = 128
  m.num_heads = 4
  m.num_kv_heads = 4
  m.head_dim = 0  # 0: d_model // num_heads
  m.mlp_dim = 384
  m.mlp_type = "swiglu"  # swiglu | geglu | gelu | relu
  m.norm = "rms"  # rms | layer
  m.norm_eps = 1e-6
  m.rope_base = 10000.0
  m.rope_fraction = 1.0  # share of each head's dims that rotate
  m.sliding_window = 0  # >0: local layers attend to this many past positions
  m.global_every = 0  # with sliding_window: every Nth effective layer is global (0: none)
  m.rope_base_local = 0.0  # rotary base of the local layers (0: model.rope_base)
  # Architecture options of the dense block (off by default: no effect, no parameters).
  m.post_norms = False  # sandwich norms: normalise the attention and MLP outputs before the residual add (Gemma 2/3)
  m.qk_norm = False  # per-head RMS/LayerNorm of queries and keys before rotary (Gemma 3, Qwen 3)
  m.scale_embeddings = False  # multiply the embedding output by sqrt(d_model) (Gemma; the tied head is unscaled)
  m.norm_offset = 0.0  # 0: norm scale w; 1: stored w with effective scale 1 + w (Gemma)
  m.query_pre_attn_scalar = 0.0  # queries scaled by this ** -0.5 (0: head_dim)
  m.rope_scaling = "none"  # none | linear | llama3 (applies to the global rotary base only)
  m.rope_scaling_factor = 1.0
  m.rope_low_freq_factor = 1.0  # llama3 only
  m.rope_high_freq_factor = 4.0  # llama3 only
  m.rope_original_max_len = 8192  # llama3 only: the context the base model was trained at
  m.tie_embeddings = True
  m.max_seq_len = 2048
  m.param_dtype = "float32"
  m.compute_dtype = "float32"
  m.remat = "none"  # none | full | dots | dots_no_batch | nested (two-level: memory ~ R, not K*R)
  m.scan = True  # False: unrolled Python loop (the reference)
  m.plan = p = ml_collections.ConfigDict()
  p.preset = "vanilla"  # vanilla | looped | cycle | sequence | middle_cycle | middle_sequence | sandwich
  p.num_layers = 4  # effective depth
  p.repeats = 1  # loops of the shared stage (ignored by vanilla; looped/sandwich repeat the shared block)
  p.per_depth_norms = False  # shared blocks keep their own norms at each depth
  m.lora = lo = ml_collections.ConfigDict()
  lo.rank = 0  # 0: strict tying
  lo.targets = "all"  # all: every projection the block has; or a list such as "q,v,down"
  lo.ranks = ""  # per-target override, e.g. "q=8,down=16"
  lo.alpha = 0.0  # 0: alpha = rank (scale 1)
  m.block = "dense"  # dense | moeut (SwitchHead + sigma-MoE, peri-layernorm)
  m.moe = mo = ml_collections.ConfigDict()  # read only when block == 'moeut'
  mo.experts = 0  # sigma-MoE experts per unique block
  mo.expert_size = 128
  mo.top_k = 8
  mo.att_experts = 8  # SwitchHead experts per head (1: plain V, sigmoid-gated O)
  mo.att_top_k = 2
  mo.mlp_balance = 0.01  # entropy regulariser coefficients
  mo.att_balance = 0.001
  mo.norm_style = "peri"  # peri | pre
  mo.dispatch = "auto"  # auto | loop | blocks | ragged | dense (auto: loop on CPU, blocks on GPU, ragged on TPU)
  mo.block_rows = 512  # largest rows per expert block of the loop dispatch (sigma-MoE: tiers down to 32)

  c.data = d = ml_collections.ConfigDict()
  d.source = "stdlib"  # stdlib | text | tokens | synthetic
  d.glob = ""  # text: glob of UTF-8 files
  d.tokens_path = ""  # tokens: directory written by recursive_lm.data.prepare
  d.tokenizer = "byte"  # byte | sentencepiece:PATH | hf:PATH
  d.max_bytes = 0  # stdlib/text: cap on corpus bytes read (0: all)
  d.val_fraction = 0.05
  d.seq_len = 128
  d.batch_size = 16
  d.num_threads = 2
  d.prefetch = 4
  d.task = "parity"  # synthetic: parity | addition | copy | induction (recursive_lm/data/synthetic.py)
  d.train_lengths = "1-8"  # synthetic: lengths trained on ('1-8' or '1,2,5')
  d.eval_lengths = "9-16"  # synthetic: held-out lengths reported by evaluate
  d.hops = 2  # synthetic induction: p of p-hop

  c.optim = o = ml_collections.ConfigDict()
  o.lr = 3e-3
  o.schedule = "cosine"  # cosine | wsd | constant
  o.warmup_steps = 50
  o.final_lr_fraction = 0.1
  o.decay_fraction = 0.2  # wsd: share of steps spent decaying
  o.weight_decay = 0.1
  o.decay_lora = False
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.clip_norm = 1.0
  o.grad_accum = 1

  c.train = t = ml_collections.ConfigDict()
  t.steps = 200
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 8
  t.checkpoint_every = 100
  t.keep_checkpoints = 2
  t.on_nonfinite = "stop"  # stop | skip
  t.peak_flops = 0.0  # per device FLOP/s for MFU; 0: known table or measured matmul peak

  c.mesh = me = ml_collections.ConfigDict()
  me.data = -1  # -1: all remaining devices
  me.fsdp = 1
  me.tensor = 1
  me.expert = 1
  me.rules = "fsdp"  # replicated | data | fsdp | fsdp_tensor | fsdp_tensor_expert
  me.distributed = False  # call jax.distributed.initialize
  return c


# Shared sizes of the byte-level configs under configs/, so that every plan is
# compared at the same width and budget. small: the default job's size (about
# 7 minutes on 2 CPU cores); tiny: a few seconds, for tests and smoke runs.
SIZES = {
    "small": dict(d_model=192, num_heads=4, mlp_dim=512, seq_len=128, batch_size=16, max_bytes=0,
                  warmup_steps=40, steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    "tiny": dict(d_model=32, num_heads=2, mlp_dim=64, seq_len=32, batch_size=4, max_bytes=200_000,
                 warmup_steps=2, steps=20, log_every=5, eval_every=10, eval_batches=2, checkpoint_every=10),
}


def byte_lm(size: str, preset: str, num_layers: int, repeats: int = 1, lora_rank: int = 0,
            per_depth_norms: bool = False) -> ml_collections.ConfigDict:
  """A byte-level model on the embedded stdlib corpus at one of SIZES."""
  if size not in SIZES:
    raise ConfigError(f"config arg size={size!r} is not one of {list(SIZES)}")
  if preset not in PLAN_PRESETS:
    raise ConfigError(f"plan {preset!r} (from the config arg) is not one of {list(PLAN_PRESETS)}")
  z = SIZES[size]
  c = base_config()
  m, p, d, t = c.model, c.model.plan, c.data, c.train
  m.vocab_size, d.source, d.tokenizer = 256, "stdlib", "byte"
  m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = z["d_model"], z["num_heads"], z["num_heads"], z["mlp_dim"]
  p.preset, p.num_layers, p.repeats, p.per_depth_norms = preset, num_layers, repeats, per_depth_norms
  m.lora.rank = lora_rank
  d.seq_len, d.batch_size, d.max_bytes = z["seq_len"], z["batch_size"], z["max_bytes"]
  c.optim.warmup_steps = z["warmup_steps"]
  t.steps, t.log_every, t.eval_every = z["steps"], z["log_every"], z["eval_every"]
  t.eval_batches, t.checkpoint_every = z["eval_batches"], z["checkpoint_every"]
  return c


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
  """Parse a `get_config` variant string like "size=tiny,repeats=3".

  The keys and types come from `defaults`; unknown keys and values that do not
  convert to the default's type are errors.
  """
  out = dict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ConfigError(f"config arg {item!r}: expected key=value (known keys: {sorted(defaults)})")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ConfigError(f"config arg {key!r} is unknown (known keys: {sorted(defaults)})")
    kind = type(defaults[key])
    try:
      if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        out[key] = value.lower() in ("true", "1")
      else:
        out[key] = kind(value)
    except ValueError:
      raise ConfigError(f"config arg {key}={value!r} is not a {kind.__name__}") from None
  return out


# ----------------------------------------------------------------------------
# The typed view.


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  preset: str
  num_layers: int
  repeats: int
  per_depth_norms: bool


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
PLAN_PRESETS = ("vanilla", "looped", "cycle", "sequence", "middle_cycle", "middle_sequence", "sandwich")
MLP_TYPES = ("swiglu", "geglu", "gelu", "relu")
REMAT = ("none", "full", "dots", "dots_no_batch", "nested")
MESH_RULES = ("replicated", "data", "fsdp", "fsdp_tensor", "fsdp_tensor_expert")


def _choice(field: str, value: str, allowed) -> str:
  if value not in allowed:
    raise ConfigError(f"{field}={value!r} is not one of {list(allowed)}")
  return value


def _positive(field: str, value, allow_zero: bool = False):
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"{field}={value} must be {'>= 0' if allow_zero else '> 0'}")
  return value


def _lora(c, model_dims: dict[str, tuple[int, int]]) -> LoraConfig:
  if c.targets.strip() == "all":
    targets = tuple(t for t in LORA_TARGETS if t in model_dims)
  else:
    targets = tuple(t.strip() for t in c.targets.split(",") if t.strip())
  for t in targets:
    _choice("model.lora.targets", t, LORA_TARGETS)
  _positive("model.lora.rank", c.rank, allow_zero=True)
  ranks = {t: c.rank for t in targets}
  for item in filter(None, (s.strip() for s in c.ranks.split(","))):
    name, _, val = item.partition("=")
    _choice("model.lora.ranks", name.strip(), LORA_TARGETS)
    try:
      ranks[name.strip()] = _positive(f"model.lora.ranks[{name.strip()}]", int(val), allow_zero=True)
    except ValueError:
      raise ConfigError(f"model.lora.ranks entry {item!r} is not target=int") from None
  for t, r in ranks.items():
    if r and t not in model_dims:
      raise ConfigError(f"model.lora target {t!r} does not exist in this model (mlp_type without a gate?)")
    if t in model_dims and r > min(model_dims[t]):
      d_in, d_out = model_dims[t]
      raise ConfigError(f"model.lora rank {r} for target {t!r} exceeds min(in={d_in}, out={d_out})")
  return LoraConfig(rank=c.rank, targets=targets, ranks=tuple(sorted((t, r) for t, r in ranks.items() if r)),
                    alpha=float(c.alpha))


def _moe(m, mesh) -> MoEConfig:
  _choice("model.block", m.block, ("dense", "moeut"))
  mo = m.moe
  moe = MoEConfig(**{f.name: mo[f.name] for f in dataclasses.fields(MoEConfig)})
  if m.block != "moeut":
    return moe
  _positive("model.moe.experts", mo.experts)
  _positive("model.moe.expert_size", mo.expert_size)
  _positive("model.moe.att_experts", mo.att_experts)
  if not 1 <= mo.top_k <= mo.experts:
    raise ConfigError(f"model.moe.top_k={mo.top_k} must be in [1, model.moe.experts={mo.experts}]")
  if not 1 <= mo.att_top_k <= mo.att_experts:
    raise ConfigError(f"model.moe.att_top_k={mo.att_top_k} must be in [1, model.moe.att_experts={mo.att_experts}]")
  _positive("model.moe.mlp_balance", mo.mlp_balance, allow_zero=True)
  _positive("model.moe.att_balance", mo.att_balance, allow_zero=True)
  _choice("model.moe.norm_style", mo.norm_style, ("peri", "pre"))
  _choice("model.moe.dispatch", mo.dispatch, ("auto", "loop", "blocks", "ragged", "dense"))
  if mo.block_rows < 8 or mo.block_rows & (mo.block_rows - 1):
    raise ConfigError(f"model.moe.block_rows={mo.block_rows} must be a power of two >= 8")
  if m.num_kv_heads != m.num_heads:
    raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} must equal model.num_heads={m.num_heads} with "
                      "model.block='moeut' (SwitchHead has no grouped-query sharing)")
  if m.lora.rank or m.lora.ranks:
    bad = [t for t in _lora(m.lora, {t: (1 << 30, 1 << 30) for t in LORA_TARGETS}).ranks if t[0] not in ("q", "k")]
    if bad:
      raise ConfigError(f"model.lora targets {[t for t, _ in bad]} are not supported with model.block='moeut' "
                        "(only q,k: the other projections are experts)")
  if mesh.rules == "fsdp_tensor_expert" and mesh.expert > 1:
    for field, n in (("model.moe.experts", mo.experts), ("model.moe.att_experts", mo.att_experts)):
      if n % mesh.expert:
        raise ConfigError(f"{field}={n} is not divisible by mesh.expert={mesh.expert} (expert sharding needs "
                          "equal shards; change the expert count or the mesh)")
  return moe


ROPE_SCALING = ("none", "linear", "llama3")


def _arch_options(m) -> dict[str, Any]:
  """The optional architecture fields of ModelConfig (Gemma / Llama features), validated."""
  _choice("model.rope_scaling", m.rope_scaling, ROPE_SCALING)
  if m.norm_offset not in (0.0, 1.0):
    raise ConfigError(f"model.norm_offset={m.norm_offset} must be 0 (scale w) or 1 (effective scale 1 + w)")
  _positive("model.query_pre_attn_scalar", m.query_pre_attn_scalar, allow_zero=True)
  if m.rope_scaling != "none":
    _positive("model.rope_scaling_factor", m.rope_scaling_factor)
  if m.rope_scaling == "llama3":
    _positive("model.rope_original_max_len", m.rope_original_max_len)
    if not 0.0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
      raise ConfigError(f"model.rope_low_freq_factor={m.rope_low_freq_factor} and model.rope_high_freq_factor="
                        f"{m.rope_high_freq_factor} must satisfy 0 < low < high (rope_scaling='llama3')")
  if m.block != "dense":
    on = [f for f, off in (("post_norms", False), ("qk_norm", False), ("query_pre_attn_scalar", 0.0),
                           ("norm_offset", 0.0)) if m[f] != off]
    if on:
      raise ConfigError(f"model.{on[0]}={m[on[0]]!r} is only supported with model.block='dense' "
                        f"(model.block={m.block!r})")
  return dict(post_norms=bool(m.post_norms), qk_norm=bool(m.qk_norm), scale_embeddings=bool(m.scale_embeddings),
              norm_offset=float(m.norm_offset), query_pre_attn_scalar=float(m.query_pre_attn_scalar),
              rope_scaling=m.rope_scaling, rope_scaling_factor=float(m.rope_scaling_factor),
              rope_low_freq_factor=float(m.rope_low_freq_factor),
              rope_high_freq_factor=float(m.rope_high_freq_factor),
              rope_original_max_len=int(m.rope_original_max_len))


def _check_schema(cd, ref, prefix: str = "") -> None:
  """Keys and value types of `cd` against base_config(): a config file's typo
  (`c.model.dmodel = 32`) adds a key ConfigDict accepts silently, and None or a
  replaced section gets past ConfigDict's own type checks."""
  import difflib
  for key in cd.keys():
    if key not in ref:
      close = difflib.get_close_matches(key, list(ref.keys()), n=1)
      hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(sorted(ref.keys()))})"
      raise ConfigError(f"config key {prefix}{key} is unknown{hint}")
  missing = [f"{prefix}{key}" for key in ref.keys() if key not in cd]
  if missing:
    raise ConfigError(f"config keys missing: {', '.join(missing)} (was {prefix.rstrip('.') or 'the config'} "
                      "replaced by a dict without them?)")
  for key, default in ref.items():
    value = cd[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not hasattr(value, "keys"):
        raise ConfigError(f"{prefix}{key}={value!r} must be a section like the default")
      _check_schema(value, default, f"{prefix}{key}.")
      continue
    kind = type(default)
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) or (
        kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
      raise ConfigError(f"{prefix}{key}={value!r} must be a{'n' if kind is int else ''} {kind.__name__} "
                        f"(default {default!r})")


def _synthetic(d) -> None:
  from recursive_lm.data import synthetic
  _choice("data.task", d.task, synthetic.TASKS)
  _positive("data.hops", d.hops)
  if d.tokenizer != "byte":
    raise ConfigError(f"data.source='synthetic' needs data.tokenizer='byte' (got {d.tokenizer!r})")
  for f in ("train_lengths", "eval_lengths"):
    try:
      lengths = synthetic.parse_lengths(d[f])
    except ValueError as e:
      raise ConfigError(f"data.{f}={d[f]!r}: {e}") from None
    need = synthetic.max_example_len(d.task, max(lengths)) - 1
    if need > d.seq_len:
      raise ConfigError(f"data.{f}={d[f]!r}: task {d.task!r} at length {max(lengths)} needs data.seq_len >= "
                        f"{need} (got {d.seq_len})")


def load(cd: ml_collections.ConfigDict) -> Config:
  """Validate a ConfigDict into the frozen `Config`. Raises ConfigError."""
  _check_schema(cd, base_config())
  m, p = cd.model, cd.model.plan
  for f in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "mlp_dim", "max_seq_len"):
    _positive(f"model.{f}", m[f])
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads} "
                      "(or set model.head_dim)")
  head_dim = m.head_dim or m.d_model // m.num_heads
  _positive("model.head_dim", head_dim)
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
  if not 0.0 < m.rope_fraction <= 1.0 or int(head_dim * m.rope_fraction) % 2:
    raise ConfigError(f"model.rope_fraction={m.rope_fraction} must be in (0, 1] and give an even number of "
                      f"rotary dims of head_dim={head_dim}")
  _choice("model.mlp_type", m.mlp_type, MLP_TYPES)
  _choice("model.norm", m.norm, ("rms", "layer"))
  _choice("model.remat", m.remat, REMAT)
  for f in ("param_dtype", "compute_dtype"):
    _choice(f"model.{f}", m[f], ("float32", "bfloat16", "float16"))
  _choice("model.plan.preset", p.preset, PLAN_PRESETS)
  _positive("model.plan.num_layers", p.num_layers)
  _positive("model.plan.repeats", p.repeats)
  plan = PlanConfig(preset=p.preset, num_layers=p.num_layers, repeats=p.repeats,
                    per_depth_norms=bool(p.per_depth_norms))
  from recursive_lm.model import plan as plan_lib  # validates divisibility with a named error
  plan_lib.from_config(plan)

  d_q, d_kv = m.num_heads * head_dim, m.num_kv_heads * head_dim
  dims = {"q": (m.d_model, d_q), "k": (m.d_model, d_kv), "v": (m.d_model, d_kv), "o": (d_q, m.d_model),
          "up": (m.d_model, m.mlp_dim), "down": (m.mlp_dim, m.d_model)}
  if m.mlp_type in ("swiglu", "geglu"):
    dims["gate"] = (m.d_model, m.mlp_dim)
  model = ModelConfig(
      vocab_size=m.vocab_size, d_model=m.d_model, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
      head_dim=head_dim, mlp_dim=m.mlp_dim, mlp_type=m.mlp_type, norm=m.norm, norm_eps=float(m.norm_eps),
      rope_base=float(m.rope_base), rope_fraction=float(m.rope_fraction), tie_embeddings=bool(m.tie_embeddings),
      max_seq_len=m.max_seq_len, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat,
      scan=bool(m.scan), plan=plan, lora=_lora(m.lora, dims), block=m.block, moe=_moe(m, cd.mesh),
      sliding_window=_positive("model.sliding_window", m.sliding_window, allow_zero=True),
      global_every=_positive("model.global_every", m.global_every, allow_zero=True),
      rope_base_local=float(_positive("model.rope_base_local", m.rope_base_local, allow_zero=True)),
      **_arch_options(m))

  d = cd.data
  _choice("data.source", d.source, ("stdlib", "text", "tokens", "synthetic"))
  if d.source == "synthetic":
    _synthetic(d)
  _positive("data.seq_len", d.seq_len)
  _positive("data.batch_size", d.batch_size)
  _positive("data.max_bytes", d.max_bytes, allow_zero=True)
  if not 0.0 < d.val_fraction < 1.0:
    raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
  if d.seq_len > m.max_seq_len:
    raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  if d.source == "text" and not d.glob:
    raise ConfigError("data.source='text' needs data.glob")
  if d.source == "tokens" and not d.tokens_path:
    raise ConfigError("data.source='tokens' needs data.tokens_path")
  data = DataConfig(**{f.name: d[f.name] for f in dataclasses.fields(DataConfig)})

  o = cd.optim
  _choice("optim.schedule", o.schedule, ("cosine", "wsd", "constant"))
  _positive("optim.lr", o.lr)
  _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
  _positive("optim.grad_accum", o.grad_accum)
  _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
  _positive("optim.clip_norm", o.clip_norm, allow_zero=True)
  _positive("optim.eps", o.eps, allow_zero=True)
  for f in ("b1", "b2"):
    if not 0.0 <= o[f] < 1.0:
      raise ConfigError(f"optim.{f}={o[f]} must be in [0, 1)")
  if not 0.0 <= o.final_lr_fraction <= 1.0:
    raise ConfigError(f"optim.final_lr_fraction={o.final_lr_fraction} must be in [0, 1]")
  if not 0.0 < o.decay_fraction <= 1.0:
    raise ConfigError(f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
  if d.batch_size % o.grad_accum:
    raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by optim.grad_accum={o.grad_accum}")
  optim = OptimConfig(**{f.name: o[f.name] for f in dataclasses.fields(OptimConfig)})

  t = cd.train
  _positive("train.steps", t.steps)
  for f in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
    _positive(f"train.{f}", t[f])
  _choice("train.on_nonfinite", t.on_nonfinite, ("stop", "skip"))
  _positive("train.peak_flops", t.peak_flops, allow_zero=True)
  train = TrainConfig(**{f.name: t[f.name] for f in dataclasses.fields(TrainConfig)})

  me = cd.mesh
  for f in ("data", "fsdp", "tensor", "expert"):
    if me[f] == 0 or me[f] < -1:
      raise ConfigError(f"mesh.{f}={me[f]} must be a positive size or -1 (the rest)")
  if sum(me[f] == -1 for f in ("data", "fsdp", "tensor", "expert")) > 1:
    raise ConfigError("mesh: at most one of data/fsdp/tensor/expert may be -1")
  _choice("mesh.rules", me.rules, MESH_RULES)
  mesh = MeshConfig(**{f.name: me[f.name] for f in dataclasses.fields(MeshConfig)})
  return Config(seed=cd.seed, model=model, data=data, optim=optim, train=train, mesh=mesh)


def from_json(text: str) -> Config:
  """Rebuild a Config from `Config.to_json()` (used by checkpoints)."""
  raw = json.loads(text)
  raw["model"]["plan"] = PlanConfig(**raw["model"]["plan"])
  if "moe" in raw["model"]:
    raw["model"]["moe"] = MoEConfig(**raw["model"]["moe"])
  lo = raw["model"]["lora"]
  raw["model"]["lora"] = LoraConfig(rank=lo["rank"], targets=tuple(lo["targets"]),
                                    ranks=tuple(tuple(x) for x in lo["ranks"]), alpha=lo["alpha"])
  return Config(seed=raw["seed"], model=ModelConfig(**raw["model"]), data=DataConfig(**raw["data"]),
                optim=OptimConfig(**raw["optim"]), train=TrainConfig(**raw["train"]), mesh=MeshConfig(**raw["mesh"]))
