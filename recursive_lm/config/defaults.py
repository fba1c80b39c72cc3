"""The ml_collections defaults every config file starts from, the shared sizes
of the byte-level configs, and the typed parser for `get_config(arg)` variant
strings."""

from __future__ import annotations

from typing import Any

import ml_collections

from recursive_lm.config.errors import ConfigError
from recursive_lm.config.schema import PLAN_PRESETS


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
  # Which layers share K/V (one KV-cache entry per distinct slot): none | cla:<s> (groups of s adjacent
  # layers) | mlkv:<n> (n KV layers over the depth) | recursion (later repeats read the first repeat's).
  m.kv_sharing = "none"
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
  # Kernels (recursive_lm/model/kernels.py); auto: blocked + custom_vjp on CPU, cudnn + xla on GPU,
  # splash + xla on TPU. A kernel the backend cannot run is an error when the model is built.
  m.kernels = ke = ml_collections.ConfigDict()
  ke.attention = "auto"  # auto | xla | cudnn | splash | blocked
  ke.dense = "auto"  # auto | custom_vjp (hand-written backward) | xla (x @ W with autodiff)
  ke.decode = "auto"  # auto (= single) | single (one query over the cache, window-only reads) | masked (attend)
  m.plan = p = ml_collections.ConfigDict()
  p.preset = "vanilla"  # vanilla | looped | cycle | sequence | middle_cycle | middle_sequence | sandwich | recurrent
  p.num_layers = 4  # effective depth (recurrent: prelude + core blocks * repeats + coda)
  p.repeats = 1  # loops of the shared stage (ignored by vanilla; looped/sandwich repeat the shared block)
  p.per_depth_norms = False  # shared blocks keep their own norms at each depth
  p.prelude = 2  # recurrent only: unique blocks before the looped core
  p.coda = 2  # recurrent only: unique blocks after it
  # Recurrent depth (preset 'recurrent', Huginn): how each core iteration sees the prelude output e, and
  # how many iterations run. Read only by that preset.
  m.recurrent = rc = ml_collections.ConfigDict()
  rc.injection = "concat"  # concat: Linear(2D -> D)([s; e]) | add: s + e | parcae: diagonal contractive decay
  rc.init_state = "normal"  # normal (Huginn: std sqrt(2 / 5D)) | zeros | prelude (the prelude output e)
  rc.backprop_depth = 8  # k: only the last k core iterations are differentiated
  rc.sample = "fixed"  # loop count per train step: fixed (plan.repeats) | poisson_lognormal | uniform
  rc.mean = 0.0  # poisson_lognormal: mean loop count r-bar (0: plan.repeats)
  rc.sigma = 0.5  # poisson_lognormal: std of the log-normal rate
  rc.min_loops = 1  # uniform: loop counts in [min_loops, max_loops]; both sampled kinds clip to it
  rc.max_loops = 32
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
  o.grad_accum = 1  # k > 1: the step runs data.batch_size rows as k micro-batches, then one update

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
