"""`load`: a (locked) ConfigDict checked into the frozen `Config`, with one
ConfigError line naming the field for every bad value.

The keys, types, choices and ranges are checked from their declarations in
`schema` (`fields.check_types`, `fields.check_values`); what is written here is
only what involves several fields, and the resolvers of the keys whose typed
value is not the one the code reads (`model.head_dim`, `model.lora`).
"""

from __future__ import annotations

import ml_collections

from recursive_lm import plan as plan_lib
from recursive_lm.config import fields
from recursive_lm.config import tasks as synthetic
from recursive_lm.config.errors import ConfigError
from recursive_lm.config.schema import LORA_TARGETS, Config, LoraConfig


def _choice(field: str, value: str, allowed) -> str:
  if value not in allowed:
    raise ConfigError(f"{field}={value!r} is not one of {list(allowed)}")
  return value


def _positive(field: str, value, allow_zero: bool = False):
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"{field}={value} must be {'>= 0' if allow_zero else '> 0'}")
  return value


def _lora(c, model_dims: dict[str, tuple[int, int]]) -> LoraConfig:
  """Resolver of model.lora: the typed targets ('all' or 'q,v') and per-target
  ranks ('q=8') -> the targets this model has and the rank of every adapter."""
  if c.targets.strip() == "all":
    targets = tuple(t for t in LORA_TARGETS if t in model_dims)
  else:
    targets = tuple(t.strip() for t in c.targets.split(",") if t.strip())
  for t in targets:
    _choice("model.lora.targets", t, LORA_TARGETS)
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


def _head_dim(m) -> int:
  """Resolver of model.head_dim (typed 0: d_model // num_heads)."""
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads} "
                      "(or set model.head_dim)")
  return m.head_dim or m.d_model // m.num_heads


def _lora_dims(m, head_dim: int) -> dict[str, tuple[int, int]]:
  """(in, out) of every projection a LoRA target can name in this model."""
  d_q, d_kv = m.num_heads * head_dim, m.num_kv_heads * head_dim
  dims = {"q": (m.d_model, d_q), "k": (m.d_model, d_kv), "v": (m.d_model, d_kv), "o": (d_q, m.d_model),
          "up": (m.d_model, m.mlp_dim), "down": (m.mlp_dim, m.d_model)}
  if m.mlp_type in ("swiglu", "geglu"):
    dims["gate"] = (m.d_model, m.mlp_dim)
  return dims


def _moe(m, mesh) -> None:
  if m.block != "moeut":
    return
  mo = m.moe
  if not 1 <= mo.top_k <= mo.experts:
    raise ConfigError(f"model.moe.top_k={mo.top_k} must be in [1, model.moe.experts={mo.experts}]")
  if not 1 <= mo.att_top_k <= mo.att_experts:
    raise ConfigError(f"model.moe.att_top_k={mo.att_top_k} must be in [1, model.moe.att_experts={mo.att_experts}]")
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


def _recurrent(m) -> None:
  """model.recurrent (its values only matter with preset 'recurrent', but a
  bad value is an error whatever the preset)."""
  rc = m.recurrent
  if rc.max_loops < rc.min_loops:
    raise ConfigError(f"model.recurrent.max_loops={rc.max_loops} must be >= model.recurrent.min_loops="
                      f"{rc.min_loops}")
  if rc.curriculum != "none" and rc.sample == "uniform":
    raise ConfigError(f"model.recurrent.curriculum={rc.curriculum!r} moves the mean loop count: it needs "
                      "model.recurrent.sample='fixed' or 'poisson_lognormal' (got 'uniform')")
  if m.plan.preset == "recurrent":
    if m.block != "dense" or m.kv_sharing != "none":
      raise ConfigError(f"model.plan.preset='recurrent' needs model.block='dense' and model.kv_sharing='none' "
                        f"(got {m.block!r}, {m.kv_sharing!r})")


def _arch_options(m) -> None:
  """The optional architecture fields (Gemma / Llama features) against each other and the block."""
  if m.rope_scaling == "llama3" and not 0.0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
    raise ConfigError(f"model.rope_low_freq_factor={m.rope_low_freq_factor} and model.rope_high_freq_factor="
                      f"{m.rope_high_freq_factor} must satisfy 0 < low < high (rope_scaling='llama3')")
  if m.block != "dense":
    on = [f for f, off in (("post_norms", False), ("qk_norm", False), ("query_pre_attn_scalar", 0.0),
                           ("norm_offset", 0.0)) if m[f] != off]
    if on:
      raise ConfigError(f"model.{on[0]}={m[on[0]]!r} is only supported with model.block='dense' "
                        f"(model.block={m.block!r})")


def _synthetic(d) -> None:
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


def _capacities(text: str, repeats: int) -> tuple[float, ...]:
  """model.mor.capacities: '' -> (R - i) / R per step i; else R values in (0, 1] that do not increase."""
  field = f"model.mor.capacities={text!r}"
  if not text.strip():
    return tuple((repeats - i) / repeats for i in range(repeats))
  try:
    caps = tuple(float(c) for c in text.split(","))
  except ValueError:
    raise ConfigError(f"{field} is not a comma-separated list of numbers") from None
  if len(caps) != repeats:
    raise ConfigError(f"{field} has {len(caps)} values; the routed stage has {repeats} recursion steps")
  bad = [c for c in caps if not 0.0 < c <= 1.0]
  if bad:
    raise ConfigError(f"{field}: capacity {bad[0]} is outside (0, 1]")
  for a, b in zip(caps, caps[1:]):
    if b > a:
      raise ConfigError(f"{field}: capacities must not increase from one recursion step to the next ({a} -> {b})")
  return caps


def _mor_capacities(m, plan: plan_lib.Plan) -> tuple[float, ...]:
  """model.mor checked against the plan (the routers act on its one repeated
  stage); returns the resolved capacities (empty when routing is none)."""
  mr = m.mor
  if mr.routing == "none":
    if mr.capacities.strip():
      raise ConfigError(f"model.mor.capacities={mr.capacities!r} is set but model.mor.routing='none'")
    return ()
  loop = plan.loop("model.mor.routing")
  for field, value, ok in (("model.plan.preset", m.plan.preset, not loop.inject),
                           ("model.block", m.block, m.block == "dense"),
                           ("model.kv_sharing", m.kv_sharing, m.kv_sharing in ("none", "recursion")),
                           ("model.sliding_window", m.sliding_window, not m.sliding_window)):
    if not ok:
      raise ConfigError(f"{field}={value!r} is not supported with model.mor.routing={mr.routing!r} (supported: "
                        "a dense, non-recurrent plan without sliding windows, KV sharing none or recursion)")
  return _capacities(mr.capacities, loop.repeats)


def _exit_weights(value, plan: plan_lib.Plan) -> tuple[float, ...]:
  """train.exit_loss_weights ('w1,w2,...' or a sequence; '' off) -> one float >= 0
  per loop of the plan's repeated cycle-order stages (boundaries + 1)."""
  field = "train.exit_loss_weights"
  items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
  if not items:
    return ()
  try:
    weights = tuple(float(v) for v in items)
  except (TypeError, ValueError):
    raise ConfigError(f"{field}={value!r} must be comma-separated numbers, one per loop") from None
  loop = plan.looped
  if loop is not None and loop.inject:
    raise ConfigError(f"{field}: the recurrent preset's run-time loop count is not supported; leave it empty")
  loops = 1 + (len(loop.boundaries) if loop is not None else 0)
  if loops == 1:
    raise ConfigError(f"{field}={value!r}: the plan has no repeated cycle-order stage (no loops to read out)")
  if len(weights) != loops:
    raise ConfigError(f"{field}={value!r} has {len(weights)} weights; the plan has {loops} loops (one weight each, "
                      "the last for the model's output)")
  if any(not w >= 0 for w in weights) or not sum(weights) > 0:
    raise ConfigError(f"{field}={value!r}: weights must be >= 0 (finite) with a positive sum")
  return weights


def load(cd: ml_collections.ConfigDict) -> Config:
  """Validate a ConfigDict into the frozen `Config`. Raises ConfigError."""
  fields.check_types(cd, Config)
  fields.check_values(cd, Config)
  m, p = cd.model, cd.model.plan
  head_dim = _head_dim(m)
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
  if not 0.0 < m.rope_fraction <= 1.0 or int(head_dim * m.rope_fraction) % 2:
    raise ConfigError(f"model.rope_fraction={m.rope_fraction} must be in (0, 1] and give an even number of "
                      f"rotary dims of head_dim={head_dim}")
  if m.kv_sharing != "none" and m.block != "dense":
    raise ConfigError(f"model.kv_sharing={m.kv_sharing!r} is only supported with model.block='dense' "
                      f"(model.block={m.block!r})")
  # The whole depth plan is checked here (divisibility, KV sharing, layer kinds), one named error each.
  depth_plan = plan_lib.build(p.preset, p.num_layers, p.repeats, bool(p.per_depth_norms), m.kv_sharing,
                              m.sliding_window, m.global_every, (p.prelude, p.coda))
  lora = _lora(m.lora, _lora_dims(m, head_dim))
  _moe(m, cd.mesh)
  _recurrent(m)
  _arch_options(m)

  d = cd.data
  if d.source == "synthetic":
    _synthetic(d)
  if d.seq_len > m.max_seq_len:
    raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  if d.source in ("text", "jsonl", "parquet", "arrayrecord") and not d.glob:
    raise ConfigError(f"data.source={d.source!r} needs data.glob")
  if d.source == "tokens" and not d.tokens_path:
    raise ConfigError("data.source='tokens' needs data.tokens_path")
  if d.batch_size % cd.optim.grad_accum:
    raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by optim.grad_accum={cd.optim.grad_accum}")

  me = cd.mesh
  axes = ("data", "fsdp", "tensor", "expert")
  for f in axes:
    if me[f] == 0 or me[f] < -1:
      raise ConfigError(f"mesh.{f}={me[f]} must be a positive size or -1 (the rest)")
  if sum(me[f] == -1 for f in axes) > 1:
    raise ConfigError("mesh: at most one of data/fsdp/tensor/expert may be -1")
  exit_weights = _exit_weights(cd.train.exit_loss_weights, depth_plan)
  capacities = _mor_capacities(m, depth_plan)
  if m.reembed_tau > 0:  # a hook at every loop start of the walk and the scan
    field = f"model.reembed_tau={m.reembed_tau}"
    if depth_plan.loop(field).inject or m.mor.routing != "none":
      raise ConfigError(f"{field} is not supported with the recurrent preset or model.mor routers (their loops "
                        "run their own paths); use a cycle-order plan without routers")
  return fields.build(Config, cd, resolved={"model.head_dim": head_dim, "model.lora": lora,
                                            "model.mor.capacities": capacities,
                                            "train.exit_loss_weights": exit_weights})
