"""BOS / EOS plumbing: which tokenizers expect BOS, how that survives a run
directory, and what the corpus code and the batches make of it.

A tiny character-level tokenizer.json (and a tokenizer-only GGUF) made here
stands in for a pretrained model's tokenizer; the byte tokenizer's data is
checked against windows cut by hand from the joined files, so the default job
is unchanged.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from recursive_lm.config import ConfigError
from recursive_lm.data import pipeline, sources, tokenizers
from test_data import REPO, data_cfg, write_corpus

CHARS = list("abcdefghijklmnopqrstuvwxyz \né.")
UNK, EOS, BOS = 0, 1, 2


def tiny_tokenizer_json(directory, bos_rule=True, config=None) -> str:
  """DIRECTORY/tokenizer.json: one token per character of CHARS after <unk>, <eos>, <bos>;
  with bos_rule the post-processor adds <bos> (as Gemma's and Llama's files do); `config`
  is written as DIRECTORY/tokenizer_config.json. Returns the tokenizer.json path."""
  tk = pytest.importorskip("tokenizers")
  vocab = {"<unk>": UNK, "<eos>": EOS, "<bos>": BOS, **{c: i + 3 for i, c in enumerate(CHARS)}}
  tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  tok.add_special_tokens(["<unk>", "<eos>", "<bos>"])
  tok.decoder = tk.decoders.Fuse()
  if bos_rule:
    tok.post_processor = tk.processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(str(directory), "tokenizer.json")
  tok.save(path)
  if config is not None:
    with open(os.path.join(str(directory), tokenizers.CONFIG_FILE), "w") as f:
      json.dump(config, f)
  return path


def char_ids(text):
  return [CHARS.index(c) + 3 for c in text]


# ----------------------------------------------------------------------------
# What each tokenizer knows.


def test_byte_tokenizer_has_no_special_tokens():
  tok = tokenizers.get_tokenizer("byte")
  assert (tok.bos_id, tok.eos_id, tok.add_bos) == (None, None, False)
  assert tokenizers.encode_prompt(tok, "ab").tolist() == [97, 98]
  assert tokenizers.document_frame(tok) == (None, None)


def test_post_processor_decides_bos_and_tokenizer_config_adds_eos(tmp_path):
  tok = tokenizers.HFTokenizer(tiny_tokenizer_json(tmp_path / "a"))
  assert (tok.bos_id, tok.eos_id, tok.add_bos) == (BOS, None, True)
  assert tok.encode("ab").tolist() == char_ids("ab")  # encode itself never adds specials
  assert tokenizers.encode_prompt(tok, "ab").tolist() == [BOS] + char_ids("ab")

  plain = tokenizers.HFTokenizer(tiny_tokenizer_json(tmp_path / "b", bos_rule=False))
  assert (plain.bos_id, plain.eos_id, plain.add_bos) == (None, None, False)
  assert tokenizers.encode_prompt(plain, "ab").tolist() == char_ids("ab")

  # tokenizer_config.json beside the file (Hugging Face's layout) names the tokens; its add_bos_token wins.
  cfg = {"bos_token": "<bos>", "eos_token": {"content": "<eos>", "special": True}}
  named = tokenizers.HFTokenizer(tiny_tokenizer_json(tmp_path / "c", bos_rule=False, config=cfg))
  assert (named.bos_id, named.eos_id, named.add_bos) == (BOS, EOS, False)
  on = tokenizers.HFTokenizer(tiny_tokenizer_json(tmp_path / "d", bos_rule=False, config={**cfg, "add_bos_token": True}))
  assert on.add_bos and tokenizers.document_frame(on) == (BOS, EOS)
  off = tokenizers.HFTokenizer(tiny_tokenizer_json(tmp_path / "e", config={"add_bos_token": False}))
  assert (off.bos_id, off.add_bos) == (BOS, False)


def test_bad_tokenizer_config_is_named(tmp_path):
  with pytest.raises(ConfigError, match=r"tokenizer_config.json names eos_token='</s>'"):
    tokenizers.HFTokenizer(tiny_tokenizer_json(tmp_path / "a", config={"eos_token": "</s>"}))
  with pytest.raises(ConfigError, match="add_bos_token but names no bos_token"):
    tokenizers.HFTokenizer(tiny_tokenizer_json(tmp_path / "b", bos_rule=False, config={"add_bos_token": True}))
  path = tiny_tokenizer_json(tmp_path / "c")
  with open(os.path.join(tmp_path / "c", tokenizers.CONFIG_FILE), "w") as f:
    f.write("{not json")
  with pytest.raises(ConfigError, match="not readable JSON"):
    tokenizers.HFTokenizer(path)


def test_save_keeps_the_special_tokens(tmp_path):
  cfg = {"bos_token": "<bos>", "eos_token": "<eos>"}
  tok = tokenizers.HFTokenizer(tiny_tokenizer_json(tmp_path / "src", config=cfg))
  again = tokenizers.HFTokenizer(tok.save(str(tmp_path / "run")))
  assert (again.bos_id, again.eos_id, again.add_bos, again.vocab_size) == (BOS, EOS, True, tok.vocab_size)
  assert again.encode("abc d").tolist() == tok.encode("abc d").tolist()


def write_tokenizer_gguf(path, **keys):
  """A GGUF file holding only tokenizer metadata (Gemma-style: <pad> <eos> <bos> <unk> first)."""
  gguf = pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "ab", "\u2581"] + [f"<0x{i:02X}>" for i in range(256)]
  w = gguf.GGUFWriter(str(path), "gemma3")
  w.add_tokenizer_model("llama")
  w.add_token_list(tokens)
  w.add_token_scores([0.0] * len(tokens))
  w.add_token_types([3, 3, 3, 2] + [1] * 4 + [6] * 256)
  w.add_unk_token_id(3)
  for key, value in keys.items():
    getattr(w, f"add_{key}")(value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_gguf_metadata_decides_bos_and_survives_save(tmp_path):
  from recursive_lm.data.gguf_tokenizer import GGUFTokenizer
  # No add_bos_token: a SentencePiece vocabulary with a BOS gets it (llama.cpp's rule).
  tok = GGUFTokenizer(write_tokenizer_gguf(tmp_path / "t.gguf", bos_token_id=2, eos_token_id=1))
  assert (tok.bos_id, tok.eos_id, tok.add_bos) == (2, 1, True)
  assert tokenizers.encode_prompt(tok, "ab").tolist() == [2, 6]
  saved = tok.save(str(tmp_path / "run"))
  again = tokenizers.get_tokenizer(f"hf:{saved}")
  assert (again.bos_id, again.eos_id, again.add_bos) == (2, 1, True)
  assert again.encode("abba").tolist() == tok.encode("abba").tolist()
  # The saved tokenizer.json alone adds BOS like the model's own file, for other readers of it.
  import tokenizers as tk
  assert tk.Tokenizer.from_file(saved).encode("ab").ids == [2, 6]

  off = GGUFTokenizer(write_tokenizer_gguf(tmp_path / "off.gguf", bos_token_id=2, eos_token_id=1,
                                           add_bos_token=False))
  assert (off.bos_id, off.eos_id, off.add_bos) == (2, 1, False)
  none = GGUFTokenizer(write_tokenizer_gguf(tmp_path / "none.gguf"))
  assert (none.bos_id, none.eos_id, none.add_bos) == (None, None, False)
  with pytest.raises(ConfigError, match="add_bos_token is set but there is no tokenizer.ggml.bos_token_id"):
    GGUFTokenizer(write_tokenizer_gguf(tmp_path / "bad.gguf", add_bos_token=True))
  with pytest.raises(ConfigError, match="eos_token_id=900 is outside the vocabulary"):
    GGUFTokenizer(write_tokenizer_gguf(tmp_path / "far.gguf", bos_token_id=2, eos_token_id=900))


# ----------------------------------------------------------------------------
# Corpora and batches.


def test_documents_are_framed_and_every_window_starts_with_bos(tmp_path):
  files = write_corpus(tmp_path / "corpus", n_files=12, size=120)
  path = tiny_tokenizer_json(tmp_path / "tok", config={"eos_token": "<eos>"})
  cfg = data_cfg(source="text", glob=str(tmp_path / "corpus" / "**" / "*.txt"), tokenizer=f"hf:{path}",
                 seq_len=16, batch_size=4, val_fraction=0.2)
  _, train, val = sources.load_splits(cfg)
  for split, is_val in ((train, False), (val, True)):
    docs = [files[r] for r in sorted(files) if sources.is_val_file(r, 0.2) == is_val]
    want = sum(([BOS] + char_ids(d.decode()) + [EOS] for d in docs), [])
    assert split.tolist() == want  # BOS + text + EOS per document, no blank line between
  windows = pipeline.TokenWindows(val, cfg.seq_len, BOS)
  assert len(windows) == len(val) // cfg.seq_len
  for k, b in enumerate(pipeline.eval_batches(cfg, 2)):
    assert (b["inputs"][:, 0] == BOS).all()
    for j in range(cfg.batch_size):
      i = (k * cfg.batch_size + j) % len(windows)
      np.testing.assert_array_equal(b["targets"][j], val[i * cfg.seq_len:(i + 1) * cfg.seq_len])
      np.testing.assert_array_equal(b["inputs"][j, 1:], b["targets"][j, :-1])
  batch = next(pipeline.train_iterator(cfg, seed=0))
  assert (batch["inputs"][:, 0] == BOS).all() and batch["inputs"].shape == (4, 16)


def test_byte_data_is_the_joined_files_cut_into_plain_windows(tmp_path):
  """The default tokenizer's batches: no BOS, no EOS, windows of T + 1 bytes of the files joined by a blank line."""
  files = write_corpus(tmp_path, n_files=30, size=200)
  cfg = data_cfg(source="text", glob=str(tmp_path / "**" / "*.txt"), seq_len=16, batch_size=4, val_fraction=0.1)
  _, train, val = sources.load_splits(cfg)
  for split, is_val in ((train, False), (val, True)):
    joined = b"\n\n".join(files[r] for r in sorted(files) if sources.is_val_file(r, 0.1) == is_val)
    assert split.tobytes() == np.frombuffer(joined, np.uint8).astype(np.int32).tobytes()
  w = cfg.seq_len + 1
  cut = lambda arr, i: np.asarray(arr[i * w:(i + 1) * w], np.int32)
  n_val = len(val) // w
  for k, b in enumerate(pipeline.eval_batches(cfg, 3)):
    rows = np.stack([cut(val, (k * cfg.batch_size + j) % n_val) for j in range(cfg.batch_size)])
    np.testing.assert_array_equal(b["inputs"], rows[:, :-1])
    np.testing.assert_array_equal(b["targets"], rows[:, 1:])
  n = len(train) // w
  it = pipeline.train_iterator(cfg, seed=0)
  seen = np.concatenate([np.concatenate([x["inputs"], x["targets"][:, -1:]], 1) for x in
                         (next(it) for _ in range(n // cfg.batch_size))])
  everything = {cut(train, i).tobytes() for i in range(n)}
  assert {r.tobytes() for r in seen} <= everything and len({r.tobytes() for r in seen}) == len(seen)


def test_prepared_tokens_record_the_frame(tmp_path):
  write_corpus(tmp_path / "corpus", n_files=12, size=120)
  path = tiny_tokenizer_json(tmp_path / "tok", config={"eos_token": "<eos>"})
  pattern, out = str(tmp_path / "corpus" / "**" / "*.txt"), tmp_path / "prepared"
  proc = subprocess.run(
      [sys.executable, "-m", "recursive_lm.data.prepare", "--source", "text", "--glob", pattern,
       "--tokenizer", f"hf:{path}", "--out", str(out), "--val_fraction", "0.2"],
      cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  meta = json.loads((out / "meta.json").read_text())
  assert (meta["document_bos"], meta["document_eos"]) == (BOS, EOS)
  cfg = data_cfg(source="tokens", tokens_path=str(out), tokenizer=f"hf:{path}", seq_len=16)
  _, train, _ = sources.load_splits(cfg)
  np.testing.assert_array_equal(train, sources.text_splits(pattern, f"hf:{path}", 200_000, 0.2)[0])
  # A directory prepared before documents were framed holds other data: refused, with the remedy.
  del meta["document_bos"], meta["document_eos"]
  (out / "meta.json").write_text(json.dumps(meta))
  sources.tokens_splits.cache_clear()
  with pytest.raises(ConfigError, match=r"data.tokens_path=.*\(None, None\).*\(2, 1\); prepare it again"):
    sources.load_splits(dataclasses.replace(cfg))
