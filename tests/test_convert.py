"""Conversion of pretrained checkpoints (recursive_lm.convert) on tiny models made here.

Tiny Llama-like and Gemma-3-like sources are written as safetensors (+ config.json)
and as GGUF (F32 and Q8_0 tensors, llama.cpp's Q/K row order for llama), read
back, and converted: the vanilla conversion equals a plain numpy forward of
the source; a cycle model with full-rank SVD LoRA (per-depth norms)
reproduces it; rank 0 is the strict recursive model; the init rules pick the
documented layers; pickle files are refused; a converted run directory is
continued by train.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recursive_lm import config as config_lib
from recursive_lm.config import ConfigError
from recursive_lm.convert import build, readers, workdir as wd
from recursive_lm.convert.readers import ConvertError
from recursive_lm import plan as plan_lib
from recursive_lm.model.transformer import Transformer

gguf = pytest.importorskip("gguf")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 260  # >= 256 so the byte tokenizer fits (the train test uses it)
LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=V,
             tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=64)
GEMMA3 = dict(model_type="gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=6,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6,
              rope_local_base_freq=10000.0, sliding_window=4, query_pre_attn_scalar=12,
              layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, vocab_size=V,
              hidden_activation="gelu_pytorch_tanh", max_position_embeddings=64)


def hf_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights under Hugging Face names ([d_out, d_in] Linear weights); every layer different."""
  rng = np.random.default_rng(seed)
  d, h, kv, hd, f = (cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                      "intermediate_size"))
  gemma = cfg["model_type"].startswith("gemma")
  w = lambda *shape: (rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float32)
  norm = lambda n: ((0.0 if gemma else 1.0) + 0.2 * rng.standard_normal(n)).astype(np.float32)
  out = {"model.embed_tokens.weight": w(cfg["vocab_size"], d), "model.norm.weight": norm(d)}
  if not cfg.get("tie_word_embeddings", gemma):
    out["lm_head.weight"] = w(cfg["vocab_size"], d)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out.update({p + "self_attn.q_proj.weight": w(h * hd, d), p + "self_attn.k_proj.weight": w(kv * hd, d),
                p + "self_attn.v_proj.weight": w(kv * hd, d), p + "self_attn.o_proj.weight": w(d, h * hd),
                p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                p + "mlp.down_proj.weight": w(d, f), p + "input_layernorm.weight": norm(d),
                p + "post_attention_layernorm.weight": norm(d)})
    if gemma:
      out.update({p + "pre_feedforward_layernorm.weight": norm(d), p + "post_feedforward_layernorm.weight": norm(d),
                  p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd)})
  return out


def write_hf(directory, cfg, weights, dtype=np.float32):
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f)
  save_file({k: v.astype(dtype) for k, v in weights.items()}, os.path.join(directory, "model.safetensors"))
  return str(directory)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  return write_hf(tmp_path_factory.mktemp("llama"), LLAMA, hf_weights(LLAMA, 1))


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
  return write_hf(tmp_path_factory.mktemp("gemma"), GEMMA3, hf_weights(GEMMA3, 2))


# ----------------------------------------------------------------------------
# A plain numpy forward of a Source, written from the Llama / Gemma 3 equations.


def _rope(x, base):
  t, hd = x.shape[1], x.shape[-1]
  inv = 1.0 / base ** (np.arange(0, hd, 2) / hd)
  ang = np.arange(t)[:, None] * inv[None]
  c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
  return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def reference_logits(src, toks):
  m = src.model
  eps, off = m["norm_eps"], m.get("norm_offset", 0.0)
  h, kvh, hd, d = m["num_heads"], m["num_kv_heads"], m["head_dim"], m["d_model"]
  norm = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (off + w)
  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  act = gelu if m["mlp_type"] == "geglu" else (lambda x: x / (1 + np.exp(-x)))
  b, t = toks.shape
  x = src.embed.astype(np.float64)[toks] * (np.sqrt(d) if m.get("scale_embeddings") else 1.0)
  qi, kj = np.arange(t)[:, None], np.arange(t)[None, :]
  for l, w in enumerate(src.layers):
    w = {k: v.astype(np.float64) for k, v in w.items()}
    window = m.get("sliding_window", 0)
    is_global = not window or (m.get("global_every") and (l + 1) % m["global_every"] == 0)
    base = m["rope_base"] if is_global else m["rope_base_local"]
    visible = (kj <= qi) & (True if is_global else (qi - kj < window))
    y = norm(x, w["attn_norm"])
    q, k, v = (y @ w["q"]).reshape(b, t, h, hd), (y @ w["k"]).reshape(b, t, kvh, hd), (y @ w["v"]).reshape(b, t, kvh, hd)
    if m.get("qk_norm"):
      q, k = norm(q, w["q_norm"]), norm(k, w["k_norm"])
    q, k = _rope(q, base), _rope(k, base)
    k, v = np.repeat(k, h // kvh, axis=2), np.repeat(v, h // kvh, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * (m.get("query_pre_attn_scalar") or hd) ** -0.5
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", p, v).reshape(b, t, h * hd) @ w["o"]
    x = x + (norm(o, w["post_attn_norm"]) if m.get("post_norms") else o)
    y = norm(x, w["mlp_norm"])
    f = (act(y @ w["gate"]) * (y @ w["up"])) @ w["down"]
    x = x + (norm(f, w["post_mlp_norm"]) if m.get("post_norms") else f)
  x = norm(x, src.final_norm)
  return x @ (src.embed.T if src.head is None else src.head)


def tokens(t=9, seed=0):
  return np.random.default_rng(seed).integers(0, V, (2, t))


def converted(src, plan="vanilla", repeats=1, rank=0, init="stepwise", per_depth_norms=False, alpha=0.0):
  cfg = config_lib.load(wd.make_config(src, plan, repeats, rank, alpha, per_depth_norms))
  model = Transformer(cfg.model, nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  pure = build.convert_params(src, cfg.model, nnx.to_pure_dict(params), init)
  nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, pure))
  nnx.update(model, params)
  return model, pure


def logits(model, toks):
  return np.asarray(model(jnp.asarray(toks, jnp.int32))[0])


# ----------------------------------------------------------------------------
# Readers.


def test_safetensors_llama_round_trip(llama_dir):
  src = readers.read(f"hf:{llama_dir}")
  weights = hf_weights(LLAMA, 1)
  assert src.family == "llama" and src.num_layers == 4
  assert src.model["num_kv_heads"] == 2 and src.model["head_dim"] == 8 and src.model["mlp_type"] == "swiglu"
  assert not src.model["tie_embeddings"] and src.model["norm_eps"] == 1e-5
  np.testing.assert_array_equal(src.layers[2]["q"], weights["model.layers.2.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(src.layers[3]["mlp_norm"], weights["model.layers.3.post_attention_layernorm.weight"])
  np.testing.assert_array_equal(src.head, weights["lm_head.weight"].T)


def test_safetensors_gemma3_round_trip_and_half_precision(gemma_dir, tmp_path):
  src = readers.read(f"hf:{gemma_dir}")
  weights = hf_weights(GEMMA3, 2)
  m = src.model
  assert src.family == "gemma3" and src.head is None and m["tie_embeddings"]
  assert (m["post_norms"], m["qk_norm"], m["scale_embeddings"], m["norm_offset"]) == (True, True, True, 1.0)
  assert (m["sliding_window"], m["global_every"], m["rope_base_local"], m["query_pre_attn_scalar"]) == (4, 3, 1e4, 12)
  # Gemma's pre-MLP norm is pre_feedforward_layernorm; post_attention_layernorm is the sandwich norm.
  np.testing.assert_array_equal(src.layers[1]["mlp_norm"], weights["model.layers.1.pre_feedforward_layernorm.weight"])
  np.testing.assert_array_equal(src.layers[1]["post_attn_norm"],
                                weights["model.layers.1.post_attention_layernorm.weight"])
  np.testing.assert_array_equal(src.layers[5]["k_norm"], weights["model.layers.5.self_attn.k_norm.weight"])
  half = readers.read(f"hf:{write_hf(tmp_path / 'f16', GEMMA3, weights, np.float16)}")
  np.testing.assert_array_equal(half.layers[0]["down"], weights["model.layers.0.mlp.down_proj.weight"]
                                .astype(np.float16).astype(np.float32).T)


def test_safetensors_bfloat16_is_widened(tmp_path):
  import ml_dtypes
  x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
  bf = x.astype(ml_dtypes.bfloat16)
  header = json.dumps({"w": {"dtype": "BF16", "shape": [3, 5], "data_offsets": [0, bf.nbytes]}}).encode()
  path = tmp_path / "bf.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header + bf.tobytes())
  np.testing.assert_array_equal(readers.read_safetensors(str(path))["w"], bf.astype(np.float32))


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def write_gguf(path, cfg, weights, quantize=("attn_v", "ffn_up", "token_embd"), tokenizer=None):
  """A GGUF file as llama.cpp's converter writes one: reversed dims, Q/K rows
  permuted for llama, Gemma norms stored as 1 + w; some tensors in Q8_0."""
  from gguf import quants
  arch = "llama" if cfg["model_type"] == "llama" else "gemma3"
  gemma = arch == "gemma3"
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_key_length(cfg["head_dim"])
  w.add_value_length(cfg["head_dim"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_rope_freq_base(cfg["rope_theta"])
  w.add_context_length(cfg["max_position_embeddings"])
  if gemma:
    w.add_sliding_window(cfg["sliding_window"])
    w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
  if tokenizer:
    w.add_tokenizer_model("llama")
    w.add_token_list(tokenizer["tokens"])
    w.add_token_scores(tokenizer["scores"])
    w.add_token_types(tokenizer["types"])
    w.add_unk_token_id(3)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
  stored = {}
  for name, x in weights.items():
    if name == "rope_freqs":
      g = "rope_freqs.weight"
    elif name == "lm_head.weight":
      g = "output.weight"
    elif name == "model.embed_tokens.weight":
      g = "token_embd.weight"
    elif name == "model.norm.weight":
      g = "output_norm.weight"
    else:
      _, _, i, rest = name.split(".", 3)
      rest = rest[: -len(".weight")]
      if rest == "post_attention_layernorm":
        g_short = "post_attention_norm" if gemma else "ffn_norm"
      elif rest == "pre_feedforward_layernorm":
        g_short = "ffn_norm"
      else:
        g_short = GGUF_NAMES[rest]
      g = f"blk.{i}.{g_short}.weight"
    if not gemma and g.endswith(("attn_q.weight", "attn_k.weight")):
      heads = cfg["num_attention_heads"] if "attn_q" in g else cfg["num_key_value_heads"]
      x = readers.permute_llama_rows(x, heads)
    if gemma and g.endswith("norm.weight"):
      x = x + 1.0
    if any(q in g for q in quantize):
      qx = quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
      w.add_tensor(g, qx, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
      x = quants.dequantize(qx, gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(g, x)
    stored[g] = x
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return stored


@pytest.mark.parametrize("cfg", [LLAMA, GEMMA3], ids=["llama", "gemma3"])
def test_gguf_round_trip(cfg, tmp_path):
  weights = hf_weights(cfg, 3)
  stored = write_gguf(tmp_path / "m.gguf", cfg, weights)
  src = readers.read(f"gguf:{tmp_path / 'm.gguf'}")
  hf = readers.read_hf(write_hf(tmp_path / "hf", cfg, weights))
  # Same architecture; GGUF stores floats as float32, and the query scale is implied (head_dim) in GGUF.
  assert set(src.model) == set(hf.model)
  for key, value in hf.model.items():
    if key == "query_pre_attn_scalar":
      continue
    # pytest >= 9.2 refuses approx on non-numbers (strings such as mlp_type, tuples), so only
    # floats get a tolerance; everything else must match exactly.
    if isinstance(value, float):
      assert src.model[key] == pytest.approx(value, rel=1e-6), key
    else:
      assert src.model[key] == value, key
  exact = lambda a, b: np.testing.assert_array_equal(a, b)
  for i in range(cfg["num_hidden_layers"]):
    for key in ("q", "k", "o", "gate", "down"):  # F32: bit-exact (Q/K rows un-permuted for llama)
      exact(src.layers[i][key], hf.layers[i][key])
    for key, name in (("v", "attn_v"), ("up", "ffn_up")):  # Q8_0: exactly what the quantised file holds
      exact(src.layers[i][key], stored[f"blk.{i}.{name}.weight"].T)
    assert np.abs(src.layers[i]["v"] - hf.layers[i]["v"]).max() < 0.05  # and close to the original
    for key in hf.layers[i]:
      if key in readers.NORMS:  # Gemma: stored as 1 + w, read back as w
        np.testing.assert_allclose(src.layers[i][key], hf.layers[i][key], atol=1e-6)
  exact(src.embed, stored["token_embd.weight"])
  assert (src.head is None) == (hf.head is None)


# ----------------------------------------------------------------------------
# Conversion.


@pytest.mark.parametrize("which", ["llama", "gemma3"])
def test_vanilla_conversion_equals_the_source_forward(which, llama_dir, gemma_dir):
  src = readers.read(f"hf:{llama_dir if which == 'llama' else gemma_dir}")
  model, _ = converted(src)
  toks = tokens()
  np.testing.assert_allclose(logits(model, toks), reference_logits(src, toks), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("plan,init", [("cycle", "stepwise"), ("sequence", "average"), ("middle_cycle", "average"),
                                       ("middle_sequence", "lower")])
def test_full_rank_lora_reproduces_the_source(plan, init, gemma_dir):
  src = readers.read(f"hf:{gemma_dir}")
  vanilla, _ = converted(src)
  model, pure = converted(src, plan, 2, "full", init, per_depth_norms=True, alpha=3.0)
  toks = tokens(seed=1)
  np.testing.assert_allclose(logits(model, toks), logits(vanilla, toks), rtol=1e-4, atol=1e-4)
  # The blocks really are shared (fewer than the source's layers) and the adapters carry the rest.
  assert sum(s.unique_blocks for s in model.plan.stages) < src.num_layers
  residual = build.relative_residuals(src, model.cfg, pure)
  assert max(residual.values()) < 1e-5, residual


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_partial_rank_lora_is_the_truncated_svd_with_the_scale_divided_out(shape):
  rng = np.random.default_rng(0)
  r = rng.standard_normal(shape)
  a, b = build.svd_lora(r, 3, scale=2.5)
  u, s, vt = np.linalg.svd(r, full_matrices=False)
  np.testing.assert_allclose(2.5 * a @ b, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)
  np.testing.assert_allclose(np.abs(a.T @ u[:, :3]), np.eye(3), atol=1e-5)  # A = U_r up to signs
  np.testing.assert_allclose(b, a.T @ r / 2.5, atol=1e-5)  # B = S_r V_r^T / s
  full_a, full_b = build.svd_lora(r, min(shape), scale=0.5)
  np.testing.assert_allclose(0.5 * full_a @ full_b, r, atol=1e-5)


def test_rank_zero_is_the_strict_recursive_model(llama_dir):
  src = readers.read(f"hf:{llama_dir}")
  strict, pure = converted(src, "cycle", 2, 0, "stepwise")
  assert strict.stages[0].slots is None  # no adapters, no per-depth norms
  blocks = pure["stages"][0]["blocks"]
  # K = 2 blocks from source layers round(linspace(0, 3, 2)) = 0 and 3.
  np.testing.assert_array_equal(blocks["attn"]["q"]["kernel"][1], src.layers[3]["q"])
  np.testing.assert_array_equal(blocks["mlp_norm"]["scale"][0], src.layers[0]["mlp_norm"])
  # A rank-2 conversion with its B factors zeroed is the same model.
  relaxed, rpure = converted(src, "cycle", 2, 2, "stepwise")
  for lora in rpure["stages"][0]["slots"]["lora"].values():
    lora["b"][...] = 0.0
  params = nnx.state(relaxed, nnx.Param)
  nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, rpure))
  nnx.update(relaxed, params)
  toks = tokens(seed=2)
  np.testing.assert_allclose(logits(relaxed, toks), logits(strict, toks), rtol=1e-5, atol=1e-5)
  # ... and a nonzero rank moves it toward the source.
  err = lambda p: np.mean(list(build.relative_residuals(src, strict.cfg if p is pure else relaxed.cfg, p).values()))
  _, rank2 = converted(src, "cycle", 2, 2, "stepwise")
  assert err(rank2) < err(pure)


def test_init_rules_pick_the_documented_source_layers():
  pick = lambda preset, init, n=18, r=2: build.source_layers(plan_lib.build(preset, n, r), n, init)
  assert pick("cycle", "stepwise") == [[[0], [2], [4], [6], [8], [11], [13], [15], [17]]]  # round(linspace(0, 17, 9))
  assert pick("sequence", "stepwise") == pick("cycle", "stepwise")
  first, middle, last = pick("middle_cycle", "stepwise")  # round(linspace(1, 16, 8)); ends stay themselves
  assert first == [[0]] and last == [[17]] and middle == [[1], [3], [5], [7], [10], [12], [14], [16]]
  assert pick("cycle", "average")[0][:2] == [[0, 9], [1, 10]]  # block k runs at depths k and k + 9
  assert pick("sequence", "average")[0][:2] == [[0, 1], [2, 3]]
  assert pick("middle_cycle", "average")[1][0] == [1, 9]
  assert pick("cycle", "lower") == [[[k] for k in range(9)]]
  assert pick("middle_sequence", "lower")[1] == [[k] for k in range(1, 9)]
  assert pick("cycle", "upper") == [[[k] for k in range(9, 18)]]
  assert pick("vanilla", "average", r=1) == [[[k] for k in range(18)]]


@pytest.mark.parametrize("init", ["stepwise", "average", "lower", "upper", "random"])
def test_converted_blocks_hold_the_picked_layers(init, gemma_dir):
  src = readers.read(f"hf:{gemma_dir}")  # 6 layers; middle_cycle R=2: first, 2 blocks x 2, last
  _, pure = converted(src, "middle_cycle", 2, 0, init)
  picks = build.source_layers(plan_lib.build("middle_cycle", 6, 2), 6, init)
  for stage, stage_picks in zip(pure["stages"].values(), picks):
    for k, src_layers in enumerate(stage_picks):
      got = stage["blocks"]["attn"]["v"]["kernel"][k]
      want = np.mean([src.layers[j]["v"] for j in src_layers], axis=0)
      if init == "random" and len(stage_picks) == 2:
        assert not np.allclose(got, want)
      else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert picks[1] == {"stepwise": [[1], [4]], "average": [[1, 3], [2, 4]], "lower": [[1], [2]],
                      "upper": [[3], [4]], "random": [[1, 3], [2, 4]]}[init]


def test_depth_not_divisible_is_an_error_naming_the_numbers(llama_dir, gemma_dir):
  with pytest.raises(ConfigError, match="num_layers=4 is not divisible by model.plan.repeats=3"):
    config_lib.load(wd.make_config(readers.read(f"hf:{llama_dir}"), "cycle", 3))
  with pytest.raises(ConfigError, match="num_layers - 2=4 is not divisible by model.plan.repeats=3"):
    config_lib.load(wd.make_config(readers.read(f"hf:{gemma_dir}"), "middle_sequence", 3))


def test_pickle_checkpoints_are_refused(tmp_path):
  for name in ("model.bin", "model.pt", "weights.pth"):
    (tmp_path / name).write_bytes(b"\x80\x04.")
    with pytest.raises(ConvertError, match="pickle"):
      readers.read(f"gguf:{tmp_path / name}")
  d = tmp_path / "torch_dir"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(LLAMA))
  (d / "pytorch_model.bin").write_bytes(b"\x80\x04.")
  with pytest.raises(ConvertError, match="pickle"):
    readers.read(f"hf:{d}")


def test_unsupported_sources_are_named(tmp_path):
  d = tmp_path / "qwen"
  write_hf(d, {**LLAMA, "model_type": "qwen2"}, {"x": np.zeros(2, np.float32)})
  with pytest.raises(ConvertError, match="model_type='qwen2'"):
    readers.read(f"hf:{d}")
  write_hf(tmp_path / "soft", {**GEMMA3, "final_logit_softcapping": 30.0}, hf_weights(GEMMA3))
  with pytest.raises(ConvertError, match="final_logit_softcapping"):
    readers.read(f"hf:{tmp_path / 'soft'}")


# ----------------------------------------------------------------------------
# Tokenizer from GGUF metadata.

TINY_TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>", "\n", "▁", "a", "b", "c", "d", "  ", "ab", "▁a", "abc", "▁ab",
                "cd", "bc", "<start>"] + [f"<0x{i:02X}>" for i in range(256)])
TINY_TYPES = [3, 3, 3, 2, 4] + [1] * 12 + [3] + [6] * 256


def spm_reference(text, tokens):
  """SentencePiece BPE by hand: repeatedly merge the adjacent pair whose
  concatenation is the earliest token in the file (Gemma's priority)."""
  ids = {t: i for i, t in enumerate(tokens)}
  pieces = list(text.replace(" ", "▁"))
  while True:
    best = min(((ids[a + b], i) for i, (a, b) in enumerate(zip(pieces, pieces[1:])) if a + b in ids), default=None)
    if best is None:
      break
    i = best[1]
    pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
  out = []
  for p in pieces:
    out += [ids[p]] if p in ids else [ids[f"<0x{b:02X}>"] for b in p.encode()]
  return out


def test_gguf_tokenizer_matches_sentencepiece_bpe(tmp_path):
  pytest.importorskip("tokenizers")
  from recursive_lm.data import gguf_tokenizer as tok_lib
  from recursive_lm.data import get_tokenizer
  tokenizer = {"tokens": TINY_TOKENS, "scores": [0.0] * len(TINY_TOKENS), "types": TINY_TYPES}
  write_gguf(tmp_path / "t.gguf", GEMMA3, hf_weights(GEMMA3), tokenizer=tokenizer)
  tok = get_tokenizer(f"gguf:{tmp_path / 't.gguf'}")
  respelled = [("▁" * len(t) if t == "  " else t) for t in TINY_TOKENS]
  for text in ["abc", "ab abc", "abcd", " a  b", "bcd cab", "zé"]:
    assert tok.encode(text).tolist() == spm_reference(text, respelled), text
    assert tok.decode(tok.encode(text)) == text
  # Control tokens stay whole; "\n" (user-defined) is matched before the BPE.
  assert tok.encode("<start>a\nab").tolist() == [17, 6, 4, 11]
  assert tok_lib.derive_merges(["a", "b", "c", "ab", "bc", "abc"], [0, -1, -2, -3, -4, -5])[:3] == [
      ("a", "b"), ("b", "c"), ("ab", "c")]


# ----------------------------------------------------------------------------
# The run directory: train continues it, evaluate reads it.


def test_converted_workdir_is_continued_by_train(gemma_dir, tmp_path):
  from recursive_lm import checkpoint, train
  src = readers.read(f"hf:{gemma_dir}")
  work = str(tmp_path / "run")
  overrides = {"data.seq_len": 8, "data.batch_size": 2, "data.max_bytes": 20_000, "train.steps": 2,
               "train.eval_every": 2, "train.eval_batches": 1, "train.checkpoint_every": 2, "train.log_every": 1,
               "mesh.data": 1}
  cd = wd.make_config(src, "cycle", 2, 4, 0.0, True, wd.write_tokenizer(src, work), overrides)
  record = wd.write_run(src, cd, work, "average", log=lambda s: None)
  assert record["blocks_from_source_layers"] == [[[0, 3], [1, 4], [2, 5]]]
  _, model, step = checkpoint.load_model(work)
  assert step == 0
  ref, _ = converted(src, "cycle", 2, 4, "average", per_depth_norms=True)
  toks = tokens(seed=3)
  np.testing.assert_allclose(logits(model, toks), logits(ref, toks), rtol=1e-6, atol=1e-6)
  # configs/converted.py rebuilds the same Config from config.json.
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "converted_cfg", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "converted.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = config_lib.load(module.get_config(f"workdir={work}"))
  assert cfg == checkpoint.load_config(work)
  summary = train.run(cfg, work, devices=jax.devices()[:1])
  assert summary["train"]["step"] == 2 and np.isfinite(summary["eval"]["eval_loss"])
  assert sorted(int(s) for s in os.listdir(os.path.join(work, "checkpoints")) if s.isdigit()) == [0, 2]


def test_sample_cli_on_a_converted_gguf_starts_with_bos_and_stops_at_eos(tmp_path):
  """The GGUF's BOS/EOS reach the run directory, its batches and `python -m recursive_lm.sample`."""
  pytest.importorskip("tokenizers")
  import subprocess
  import sys
  import tokenizers as tk
  from recursive_lm import checkpoint, data
  from recursive_lm.data.tokenizers import encode_prompt
  from recursive_lm.inference import generate
  cfg = {**GEMMA3, "vocab_size": len(TINY_TOKENS)}
  tokenizer = {"tokens": TINY_TOKENS, "scores": [0.0] * len(TINY_TOKENS), "types": TINY_TYPES}
  write_gguf(tmp_path / "m.gguf", cfg, hf_weights(cfg, 5), tokenizer=tokenizer)  # BOS 2, EOS 1
  src = readers.read(f"gguf:{tmp_path / 'm.gguf'}")
  work = str(tmp_path / "run")
  spec = wd.write_tokenizer(src, work)
  overrides = {"data.seq_len": 8, "data.batch_size": 2, "data.max_bytes": 20_000, "mesh.data": 1}
  wd.write_run(src, wd.make_config(src, tokenizer=spec, overrides=overrides), work, log=lambda s: None)
  run_cfg, model, _ = checkpoint.load_model(work)
  tok = data.get_tokenizer(run_cfg.data.tokenizer)
  assert (run_cfg.data.tokenizer, tok.bos_id, tok.eos_id, tok.add_bos) == (spec, 2, 1, True)
  assert (data.eval_batches(run_cfg.data, 1)[0]["inputs"][:, 0] == 2).all()  # what evaluate reads

  prompt = "ab a"
  ids = encode_prompt(tok, prompt)
  assert ids[0] == 2 and ids[1:].tolist() == tok.encode(prompt).tolist()
  new = np.asarray(generate(model, ids[None], 10)[0, len(ids):])

  def sample(*extra):
    res = subprocess.run([sys.executable, "-m", "recursive_lm.sample", "--workdir", work, "--prompt", prompt,
                          "--max_new_tokens", "10", *extra], capture_output=True, text=True, encoding="utf-8",
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout

  assert sample("--ignore_eos") == tok.decode(np.concatenate([ids[1:], new])) + "\n"
  # Make a token the model draws late its EOS (tokenizer_config.json is where the run keeps it).
  k = max(i for i in range(len(new)) if new[i] not in new[:i])
  with open(os.path.join(work, "tokenizer_config.json")) as f:
    specials = json.load(f)
  specials["eos_token"] = tk.Tokenizer.from_file(os.path.join(work, "tokenizer.json")).id_to_token(int(new[k]))
  with open(os.path.join(work, "tokenizer_config.json"), "w") as f:
    json.dump(specials, f)
  assert sample() == tok.decode(np.concatenate([ids[1:], new[:k]])) + "\n"


def test_cli_reports_a_bad_depth_in_one_line(llama_dir, tmp_path):
  import subprocess
  import sys
  run = subprocess.run([sys.executable, "-m", "recursive_lm.convert", "--source", f"hf:{llama_dir}", "--workdir",
                        str(tmp_path / "w"), "--plan", "cycle", "--repeats", "3"], capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 2
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "num_layers=4 is not divisible by model.plan.repeats=3" in last
  assert not os.path.isdir(tmp_path / "w" / "checkpoints")


def test_cli_from_safetensors_prints_only_the_projects_lines(llama_dir, tmp_path):
  import subprocess
  import sys
  work = tmp_path / "w"
  run = subprocess.run([sys.executable, "-m", "recursive_lm.convert", "--source", f"hf:{llama_dir}", "--workdir",
                        str(work), "--plan", "cycle", "--repeats", "2"], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  lines = run.stderr.strip().splitlines()
  assert not [l for l in lines if "absl" in l or l.startswith(("INFO", "I1", "I0"))], lines
  assert lines[0].startswith("read hf:") and lines[-1].startswith("continue with:")
  assert "CheckpointManager" in (work / "logs" / "convert.log").read_text()  # the library's records: in the log


def test_llama3_rope_scaling_from_config_and_from_gguf_rope_freqs(tmp_path):
  scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
  cfg = {**LLAMA, "rope_scaling": scaling}
  weights = hf_weights(cfg, 4)
  hf = readers.read(f"hf:{write_hf(tmp_path / 'hf', cfg, weights)}")
  assert (hf.model["rope_scaling"], hf.model["rope_scaling_factor"], hf.model["rope_original_max_len"]) == (
      "llama3", 32.0, 8192)
  # llama.cpp bakes the rule into a rope_freqs tensor of divisors (inv_freq / scaled inv_freq).
  from recursive_lm.model.layers import scaled_inv_freq
  inv = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
  freqs = (inv / np.asarray(scaled_inv_freq(jnp.asarray(inv, jnp.float32), ("llama3", 32.0, 1.0, 4.0, 8192.0))))
  write_gguf(tmp_path / "m.gguf", LLAMA, {**weights, "rope_freqs": freqs.astype(np.float32)}, quantize=())
  src = readers.read(f"gguf:{tmp_path / 'm.gguf'}")
  for key in ("rope_scaling", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
              "rope_original_max_len"):
    assert src.model[key] == hf.model[key], key
