"""Reading pretrained checkpoints into one neutral form (`Source`).

  src = read("gguf:/path/model.gguf")        # llama.cpp GGUF, any quantisation gguf can dequantize
  src = read("hf:/path/to/model_dir")        # config.json + *.safetensors (Hugging Face layout)

Families: Llama (RMSNorm, SwiGLU, GQA, optional Llama 3.1 rope scaling), Gemma
(1) and Gemma 3 text (GeGLU, 1 + w norm scales, sqrt(D) embedding scale; Gemma 3
adds sandwich norms, q/k norms, local/global layers). Pickle checkpoints
(`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`) are refused: unpickling runs code.

`Source` holds float32 numpy arrays in this package's conventions:
kernels [d_in, d_out] (x @ W), norm scales as our `Norm` stores them (w, with
effective scale `norm_offset + w`), and per layer a dict keyed by
`LAYER_KEYS`. `model` holds the `base_config().model` values that describe the
architecture.

GGUF details handled here: dims are listed fastest-first (ne0 = d_in), so a
[d_out, d_in] matrix reads as numpy [d_out, d_in] after reversing; every
tensor is dequantized to float32 with `gguf.quants.dequantize`; llama.cpp's
converter permutes the rows of Q and K of *llama* files (its rotary pairs
adjacent dims, Hugging Face pairs i with i + Hd/2) and the permutation is
undone here; Gemma files are written without it (llama.cpp runs Gemma with
the half-split rotary) but store every norm weight as 1 + w, undone here.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
from typing import Any

import numpy as np

from recursive_lm.config import ConfigError

KERNELS = ("q", "k", "v", "o", "gate", "up", "down")
NORMS = ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm")
LAYER_KEYS = KERNELS + NORMS
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class ConvertError(ConfigError):
  """A source that cannot be converted; the message names the file and the reason."""


@dataclasses.dataclass
class Source:
  family: str  # llama | gemma | gemma3
  model: dict[str, Any]  # base_config().model overrides: widths and architecture options
  embed: np.ndarray  # [V, D]
  final_norm: np.ndarray  # [D]
  layers: list[dict[str, np.ndarray]]  # per source layer: LAYER_KEYS present in this family
  head: np.ndarray | None = None  # [D, V] when the output head is not tied
  tokenizer: dict | None = None  # {'kind': 'gguf', 'path'} or {'kind': 'hf', 'path': tokenizer.json}
  origin: str = ""

  @property
  def num_layers(self) -> int:
    return len(self.layers)


def refuse_pickle(path: str) -> None:
  if path.lower().endswith(PICKLE_SUFFIXES):
    raise ConvertError(f"refusing {path}: pickle checkpoints (.bin/.pt/.pth/.ckpt/.pkl) can run arbitrary code "
                       "when loaded; convert it to safetensors first")


def read(spec: str) -> Source:
  """'gguf:PATH' | 'hf:DIR' (or a bare path: a file is GGUF, a directory HF) -> Source."""
  kind, sep, path = spec.partition(":")
  if not sep or kind not in ("gguf", "hf"):
    kind, path = ("hf" if os.path.isdir(spec) else "gguf"), spec
  refuse_pickle(path)
  if not os.path.exists(path):
    raise ConvertError(f"--source {spec}: {path} does not exist")
  return read_gguf(path) if kind == "gguf" else read_hf(path)


# ----------------------------------------------------------------------------
# GGUF.


def unpermute_llama_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row order for llama files: within each head the GGUF
  rows are the rotary pairs interleaved (0, half, 1, half+1, ...); HF order is
  the two halves one after the other. w: [n_head * Hd, d_in]."""
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_llama_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation (HF -> GGUF), the inverse of `unpermute_llama_rows` (used by tests)."""
  rows = w.shape[0]
  return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# The Llama 3.x rope scalings llama.cpp bakes into a `rope_freqs` tensor; the
# file stores only the resulting per-frequency divisors, so they are matched
# against these to recover the rule.
_LLAMA3_CANDIDATES = ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192))

_GGUF_LAYER_NAMES = {
    "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
    "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
    "attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "post_attn_norm": "post_attention_norm",
    "post_mlp_norm": "post_ffw_norm", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
}


def read_gguf(path: str) -> Source:
  try:
    import gguf
    from gguf import quants
  except ImportError:
    raise ConvertError("reading GGUF needs the gguf package (pip install gguf, or pip install -e '.[convert]')") from None
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError / struct errors on a file that is not GGUF
    raise ConvertError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
  arch = _gguf_field(reader, "general.architecture")
  if arch not in ("llama", "gemma", "gemma3"):
    raise ConvertError(f"{path}: general.architecture={arch!r} is not supported (llama, gemma, gemma3)")
  tensors = {t.name: t for t in reader.tensors}

  def meta(key, default=None, required=False):
    value = _gguf_field(reader, f"{arch}.{key}")
    if value is None and required:
      raise ConvertError(f"{path}: metadata {arch}.{key} is missing")
    return default if value is None else value

  def tensor(name: str) -> np.ndarray:
    t = tensors.get(name)
    if t is None:
      raise ConvertError(f"{path}: tensor {name!r} is missing")
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
    data = np.asarray(t.data)
    if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F64):
      data = quants.dequantize(data, t.tensor_type)
    return np.ascontiguousarray(data.reshape(shape), dtype=np.float32)

  n_layers = int(meta("block_count", required=True))
  d = int(meta("embedding_length", required=True))
  heads = int(meta("attention.head_count", required=True))
  kv_heads = int(meta("attention.head_count_kv", heads))
  head_dim = int(meta("attention.key_length", d // heads))
  if int(meta("attention.value_length", head_dim)) != head_dim:
    raise ConvertError(f"{path}: key_length != value_length is not supported")
  embed = tensor("token_embd.weight")
  model = dict(vocab_size=embed.shape[0], d_model=d, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
               mlp_dim=int(meta("feed_forward_length", required=True)),
               norm="rms", norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
               rope_base=float(meta("rope.freq_base", 10000.0)),
               max_seq_len=int(meta("context_length", 2048)),
               tie_embeddings="output.weight" not in tensors)
  rot = meta("rope.dimension_count")
  if rot is not None and int(rot) != head_dim:
    model["rope_fraction"] = int(rot) / head_dim
  gemma = arch.startswith("gemma")
  model.update(_family_options(arch, model, n_layers))
  if arch == "gemma3":
    model["sliding_window"] = int(meta("attention.sliding_window", 512))
    model["rope_base_local"] = float(meta("rope.freq_base_swa", 10000.0))
    pattern = meta("attention.sliding_window_pattern")  # newer files: a period, or per layer True = local
    if isinstance(pattern, list):
      globals_ = [i for i, local in enumerate(pattern) if not local]
      period = globals_[0] + 1 if globals_ else 0
      if globals_ != [i for i in range(n_layers) if period and (i + 1) % period == 0]:
        raise ConvertError(f"{path}: sliding_window_pattern puts global layers at {globals_}, not every "
                           f"{period}th layer (the only layout model.global_every can express)")
      model["global_every"] = period
    elif pattern is not None:
      model["global_every"] = int(pattern)
  scaling = meta("rope.scaling.type")
  if scaling not in (None, "none"):
    if scaling != "linear":
      raise ConvertError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported (linear, or llama3 "
                         "baked into rope_freqs)")
    model.update(rope_scaling="linear", rope_scaling_factor=float(meta("rope.scaling.factor", 1.0)))
  if "rope_freqs.weight" in tensors:
    model.update(_llama3_from_rope_freqs(path, tensor("rope_freqs.weight"), model))

  offset = 1.0 if gemma else 0.0  # llama.cpp's converter writes Gemma norms as 1 + w
  layers = []
  for i in range(n_layers):
    layer = {}
    for key, name in _GGUF_LAYER_NAMES.items():
      full = f"blk.{i}.{name}.weight"
      if full not in tensors:
        continue
      w = tensor(full)
      if key in KERNELS:
        if arch == "llama" and key in ("q", "k"):
          w = unpermute_llama_rows(w, heads if key == "q" else kv_heads)
        layer[key] = np.ascontiguousarray(w.T)  # [d_out, d_in] -> [d_in, d_out]
      else:
        layer[key] = w - offset
    layers.append(_check_layer(path, i, layer, model))
  head = None if model["tie_embeddings"] else np.ascontiguousarray(tensor("output.weight").T)
  return Source(family=arch, model=model, embed=embed, final_norm=tensor("output_norm.weight") - offset,
                layers=layers, head=head, tokenizer={"kind": "gguf", "path": os.path.abspath(path)}
                if _gguf_field(reader, "tokenizer.ggml.model") else None, origin=f"gguf:{os.path.abspath(path)}")


def _gguf_field(reader, key):
  f = reader.fields.get(key)
  return None if f is None else f.contents()


def _llama3_from_rope_freqs(path: str, freqs: np.ndarray, model: dict) -> dict:
  """Recover the Llama 3.x rope scaling whose divisors llama.cpp stored in rope_freqs."""
  from recursive_lm.model.layers import scaled_inv_freq
  rot = int(model["head_dim"] * model.get("rope_fraction", 1.0))
  inv = 1.0 / model["rope_base"] ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
  for factor, low, high, original in _LLAMA3_CANDIDATES:
    got = np.asarray(scaled_inv_freq(inv.astype(np.float32), ("llama3", factor, low, high, float(original))))
    if got.shape == freqs.shape and np.allclose(inv / freqs, got, rtol=1e-4):
      return dict(rope_scaling="llama3", rope_scaling_factor=factor, rope_low_freq_factor=low,
                  rope_high_freq_factor=high, rope_original_max_len=original)
  raise ConvertError(f"{path}: rope_freqs matches none of the known Llama 3 rope scalings {_LLAMA3_CANDIDATES}")


# ----------------------------------------------------------------------------
# Family options shared by both readers.


def _family_options(family: str, model: dict, n_layers: int) -> dict:
  if family == "llama":
    return dict(mlp_type="swiglu")
  opts = dict(mlp_type="geglu", norm_offset=1.0, scale_embeddings=True)
  if family == "gemma3":
    # Gemma 3 27B scales queries by (d_model / heads) ** -0.5; the other sizes by head_dim ** -0.5
    # (llama.cpp hard-codes the same rule; HF configs state it as query_pre_attn_scalar).
    scalar = model["d_model"] / model["num_heads"] if n_layers == 62 else model["head_dim"]
    opts.update(post_norms=True, qk_norm=True, query_pre_attn_scalar=float(scalar), global_every=6,
                rope_base_local=10000.0)
  return opts


def _check_layer(path: str, i: int, layer: dict, model: dict) -> dict:
  need = ["q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm"]
  if model.get("post_norms"):
    need += ["post_attn_norm", "post_mlp_norm"]
  if model.get("qk_norm"):
    need += ["q_norm", "k_norm"]
  missing = [k for k in need if k not in layer]
  if missing:
    raise ConvertError(f"{path}: layer {i} lacks {', '.join(missing)}")
  d, hd = model["d_model"], model["head_dim"]
  shapes = {"q": (d, model["num_heads"] * hd), "k": (d, model["num_kv_heads"] * hd),
            "v": (d, model["num_kv_heads"] * hd), "o": (model["num_heads"] * hd, d),
            "gate": (d, model["mlp_dim"]), "up": (d, model["mlp_dim"]), "down": (model["mlp_dim"], d),
            "q_norm": (hd,), "k_norm": (hd,)}
  for key, w in layer.items():
    want = shapes.get(key, (d,))
    if w.shape != want:
      raise ConvertError(f"{path}: layer {i} {key} has shape {w.shape}, expected {want} from the metadata")
  return {k: layer[k] for k in need}


# ----------------------------------------------------------------------------
# Hugging Face safetensors directories.

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays (BF16 widened to float32).

  The format: 8-byte little-endian header length, a JSON header
  {name: {dtype, shape, data_offsets}}, then the raw little-endian data."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    lo, hi = info["data_offsets"]
    buf = raw[lo:hi]
    if info["dtype"] == "BF16":  # the top half of a float32
      arr = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif info["dtype"] in _ST_DTYPES:
      arr = buf.view(_ST_DTYPES[info["dtype"]])
    else:
      raise ConvertError(f"{path}: tensor {name} has dtype {info['dtype']}, not one of F32/F16/BF16")
    out[name] = arr.reshape(info["shape"])
  return out


_HF_LAYER_NAMES = {
    "llama": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
              "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
}
_HF_LAYER_NAMES["gemma"] = _HF_LAYER_NAMES["llama"]
_HF_LAYER_NAMES["gemma3"] = {**_HF_LAYER_NAMES["llama"], "mlp_norm": "pre_feedforward_layernorm",
                             "post_attn_norm": "post_attention_layernorm",
                             "post_mlp_norm": "post_feedforward_layernorm",
                             "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
_HF_FAMILIES = {"llama": "llama", "mistral": "llama", "gemma": "gemma", "gemma3_text": "gemma3", "gemma3": "gemma3"}


def _rope_params(cfg: dict, kind: str = "full_attention") -> dict:
  """Rotary settings from either the classic keys (rope_theta, rope_scaling) or
  transformers' newer rope_parameters (flat, or per layer type)."""
  params = cfg.get("rope_parameters")
  if isinstance(params, dict) and kind in params and isinstance(params[kind], dict):
    params = params[kind]
  if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
    return params
  out = dict(cfg.get("rope_scaling") or {})
  if "rope_theta" in cfg:
    out["rope_theta"] = cfg["rope_theta"]
  return out


def read_hf(directory: str) -> Source:
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.isfile(cfg_path):
    raise ConvertError(f"hf:{directory}: no config.json (expected a Hugging Face model directory)")
  with open(cfg_path) as f:
    cfg = json.load(f)
  if "text_config" in cfg:  # multimodal Gemma 3: the text backbone's settings
    cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", "gemma3_text")}
  mtype = cfg.get("model_type", "")
  family = _HF_FAMILIES.get(mtype)
  if family is None:
    raise ConvertError(f"hf:{directory}: model_type={mtype!r} is not supported ({', '.join(sorted(_HF_FAMILIES))})")
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    pickles = [p for p in os.listdir(directory) if p.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
      refuse_pickle(os.path.join(directory, pickles[0]))
    raise ConvertError(f"hf:{directory}: no *.safetensors files")
  weights = {}
  for p in files:
    weights.update(read_safetensors(p))
  for flag in ("attention_bias", "mlp_bias"):
    if cfg.get(flag):
      raise ConvertError(f"hf:{directory}: {flag}=true is not supported (the blocks have no biases)")
  for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
    if cfg.get(cap):
      raise ConvertError(f"hf:{directory}: {cap}={cfg[cap]} is not supported (no logit soft-capping)")
  act = cfg.get("hidden_activation") or cfg.get("hidden_act")
  # HF runs every Gemma MLP with the tanh-approximate GELU, whatever older configs call it.
  allowed = ("silu",) if family == "llama" else ("gelu_pytorch_tanh", "gelu", "gelu_new")
  if act is not None and act not in allowed:
    raise ConvertError(f"hf:{directory}: activation {act!r} is not supported for {mtype} ({', '.join(allowed)})")

  embed_key = next((k for k in weights if k.endswith("embed_tokens.weight")), None)
  if embed_key is None:
    raise ConvertError(f"hf:{directory}: no *embed_tokens.weight tensor")
  prefix = embed_key[: -len("embed_tokens.weight")]  # e.g. 'model.' or 'model.language_model.'

  def get(name: str) -> np.ndarray:
    if name not in weights:
      raise ConvertError(f"hf:{directory}: tensor {name!r} is missing")
    return np.asarray(weights[name], dtype=np.float32)

  d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
  head_dim = int(cfg.get("head_dim") or d // heads)
  n_layers = int(cfg["num_hidden_layers"])
  rope = _rope_params(cfg)
  default_eps = 1e-6 if family != "llama" else 1e-5
  tie_default = family != "llama"
  model = dict(vocab_size=int(cfg.get("vocab_size") or get(embed_key).shape[0]), d_model=d, num_heads=heads,
               num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
               mlp_dim=int(cfg["intermediate_size"]), norm="rms", norm_eps=float(cfg.get("rms_norm_eps", default_eps)),
               rope_base=float(rope.get("rope_theta", 10000.0)),
               max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
               tie_embeddings=bool(cfg.get("tie_word_embeddings", tie_default)))
  if cfg.get("partial_rotary_factor", 1.0) != 1.0:
    model["rope_fraction"] = float(cfg["partial_rotary_factor"])
  model.update(_family_options(family, model, n_layers))
  if mtype == "mistral" and cfg.get("sliding_window"):
    model["sliding_window"] = int(cfg["sliding_window"])  # every layer local (global_every 0)
  if family == "gemma3":
    model["query_pre_attn_scalar"] = float(cfg.get("query_pre_attn_scalar", head_dim))
    model["sliding_window"] = int(cfg.get("sliding_window") or 0)
    local = _rope_params(cfg, "sliding_attention")
    model["rope_base_local"] = float(cfg.get("rope_local_base_freq") or local.get("rope_theta") or 10000.0)
    model["global_every"] = _global_every(directory, cfg, n_layers)
  kind = rope.get("rope_type") or rope.get("type")
  if kind in ("linear", "llama3"):
    model.update(rope_scaling=kind, rope_scaling_factor=float(rope["factor"]))
    if kind == "llama3":
      model.update(rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                   rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                   rope_original_max_len=int(rope.get("original_max_position_embeddings", 8192)))
  elif kind not in (None, "default"):
    raise ConvertError(f"hf:{directory}: rope scaling {kind!r} is not supported (linear, llama3)")

  names = _HF_LAYER_NAMES[family]
  layers = []
  for i in range(n_layers):
    layer = {}
    for key, name in names.items():
      full = f"{prefix}layers.{i}.{name}.weight"
      if full not in weights:
        continue
      w = get(full)
      layer[key] = np.ascontiguousarray(w.T) if key in KERNELS else w  # torch Linear: [d_out, d_in]
    layers.append(_check_layer(f"hf:{directory}", i, layer, model))
  head = None
  if not model["tie_embeddings"]:
    head_key = next((k for k in weights if k.endswith("lm_head.weight")), None)
    head = np.ascontiguousarray(get(head_key).T) if head_key else None
    if head is None:
      raise ConvertError(f"hf:{directory}: tie_word_embeddings is false but there is no lm_head.weight")
  tok = os.path.join(directory, "tokenizer.json")
  return Source(family=family, model=model, embed=get(embed_key), final_norm=get(f"{prefix}norm.weight"),
                layers=layers, head=head,
                tokenizer={"kind": "hf", "path": os.path.abspath(tok)} if os.path.isfile(tok) else None,
                origin=f"hf:{os.path.abspath(directory)}")


def _global_every(directory: str, cfg: dict, n_layers: int) -> int:
  """Gemma 3's local/global layout as a period: layer l is global when (l + 1) % period == 0."""
  types = cfg.get("layer_types")
  period = int(cfg.get("sliding_window_pattern") or 6)
  if types:
    globals_ = [i for i, t in enumerate(types) if t != "sliding_attention"]
    period = globals_[0] + 1 if globals_ else 0
    expected = [i for i in range(n_layers) if period and (i + 1) % period == 0]
    if globals_ != expected:
      raise ConvertError(f"hf:{directory}: layer_types puts global layers at {globals_}, which is not every "
                         f"{period}th layer (the only layout model.global_every can express)")
  return period
