"""`load`: a (locked) ConfigDict checked field by field into the frozen
`Config`, with one ConfigError line naming the field for every bad value."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from recursive_lm import plan as plan_lib
from recursive_lm.config import tasks as synthetic
from recursive_lm.config.defaults import base_config
from recursive_lm.config.errors import ConfigError
from recursive_lm.config.schema import (ATTENTION_KERNELS, DECODE_KERNELS, DENSE_KERNELS, INIT_STATES, INJECTIONS,
                                        LOOP_SAMPLES, LORA_TARGETS, MESH_RULES, MLP_TYPES, PLAN_PRESETS, REMAT, Config,
                                        DataConfig,
                                        KernelsConfig, LoraConfig, MeshConfig, MoEConfig, ModelConfig, OptimConfig,
                                        PlanConfig, RecurrentConfig, TrainConfig)


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


def _recurrent(m) -> RecurrentConfig:
  """model.recurrent, checked (its values only matter with preset 'recurrent',
  but a bad value is an error whatever the preset)."""
  rc = m.recurrent
  _choice("model.recurrent.injection", rc.injection, INJECTIONS)
  _choice("model.recurrent.init_state", rc.init_state, INIT_STATES)
  _choice("model.recurrent.sample", rc.sample, LOOP_SAMPLES)
  _positive("model.recurrent.backprop_depth", rc.backprop_depth)
  _positive("model.recurrent.mean", rc.mean, allow_zero=True)
  _positive("model.recurrent.sigma", rc.sigma)
  _positive("model.recurrent.min_loops", rc.min_loops)
  if rc.max_loops < rc.min_loops:
    raise ConfigError(f"model.recurrent.max_loops={rc.max_loops} must be >= model.recurrent.min_loops="
                      f"{rc.min_loops}")
  if m.plan.preset == "recurrent":
    if m.block != "dense" or m.kv_sharing != "none":
      raise ConfigError(f"model.plan.preset='recurrent' needs model.block='dense' and model.kv_sharing='none' "
                        f"(got {m.block!r}, {m.kv_sharing!r})")
  return RecurrentConfig(**{f.name: rc[f.name] for f in dataclasses.fields(RecurrentConfig)})


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
                    per_depth_norms=bool(p.per_depth_norms), prelude=p.prelude, coda=p.coda)
  if m.kv_sharing != "none" and m.block != "dense":
    raise ConfigError(f"model.kv_sharing={m.kv_sharing!r} is only supported with model.block='dense' "
                      f"(model.block={m.block!r})")
  # The whole depth plan is checked here (divisibility, KV sharing, layer kinds), one named error each.
  plan_lib.build(plan.preset, plan.num_layers, plan.repeats, plan.per_depth_norms, m.kv_sharing,
                 m.sliding_window, m.global_every, (plan.prelude, plan.coda))

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
      kv_sharing=m.kv_sharing,
      kernels=KernelsConfig(attention=_choice("model.kernels.attention", m.kernels.attention, ATTENTION_KERNELS),
                            dense=_choice("model.kernels.dense", m.kernels.dense, DENSE_KERNELS),
                            decode=_choice("model.kernels.decode", m.kernels.get("decode", "auto"), DECODE_KERNELS)),
      recurrent=_recurrent(m),
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
