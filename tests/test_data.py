"""Tests for recursive_lm.data: tokenizers, corpora and splits, the prepare CLI, batch pipelines."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from recursive_lm import config as config_lib
from recursive_lm.config import ConfigError, DataConfig
from recursive_lm.data import pipeline, sources, tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_cfg(**overrides) -> DataConfig:
  # Built from base_config() directly: config.load() also validates the model
  # section, which this file has no business depending on.
  d = config_lib.base_config().data
  base = DataConfig(**{f.name: d[f.name] for f in dataclasses.fields(DataConfig)})
  return dataclasses.replace(base, **{"max_bytes": 200_000, "seq_len": 32, "batch_size": 8, **overrides})


def write_corpus(root, n_files=40, size=300):
  """n small text files in nested dirs; returns {relpath: bytes}."""
  rng = np.random.default_rng(0)
  out = {}
  for i in range(n_files):
    rel = f"d{i % 3}/sub/f{i:03d}.txt"
    text = "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, size)) + " é\n"
    os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
    with open(os.path.join(root, rel), "w", encoding="utf-8") as f:
      f.write(text)
    out[rel] = text.encode()
  return out


# ----------------------------------------------------------------------------
# Tokenizers.


def test_byte_tokenizer_round_trip():
  tok = tokenizers.get_tokenizer("byte")
  text = "def f(x):\n  return x  # ünïcödé ✓"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < tok.vocab_size == 256
  assert len(ids) == len(text.encode())
  assert tok.decode(ids) == text
  assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut-off character decodes, it does not raise
  assert tok.is_byte_level


def test_bad_tokenizer_specs_name_the_field():
  for spec in ("bytes", "hf:", "sentencepiece"):
    with pytest.raises(ConfigError, match="data.tokenizer"):
      tokenizers.get_tokenizer(spec)
  with pytest.raises(ConfigError, match="data.tokenizer"):  # package missing or file missing: either way, one line
    tokenizers.get_tokenizer("sentencepiece:/nonexistent/model.spm")


# ----------------------------------------------------------------------------
# Corpora and splits.


def test_stdlib_corpus_split_is_deterministic_and_disjoint():
  files = sources.stdlib_files()
  rels = [r for r, _ in files]
  assert len(files) > 100 and rels == sorted(rels)
  assert not any(r.startswith(("test/", "idlelib/", "lib2to3/", "site-packages/")) or "/tests/" in r for r in rels)
  val_rels = [r for r in rels if sources.is_val_file(r, 0.05)]
  assert 0 < len(val_rels) < len(rels) / 5

  train, val = sources.stdlib_splits("byte", 200_000, 0.05)
  # The cap splits as round(max_bytes * val_fraction) for validation, the rest for train.
  assert (len(train), len(val)) == (190_000, 10_000)
  assert train.dtype == val.dtype == np.int32 and not train.flags.writeable
  # Each side starts with its first file (by relpath): the split is by file, not by offset.
  first = {is_val: next(p for r, p in files if sources.is_val_file(r, 0.05) == is_val) for is_val in (False, True)}
  for arr, is_val in ((train, False), (val, True)):
    head = open(first[is_val], "rb").read()[:1000]
    assert arr[:len(head)].astype(np.uint8).tobytes() == head

  sources.stdlib_splits.cache_clear()
  train2, val2 = sources.stdlib_splits("byte", 200_000, 0.05)
  np.testing.assert_array_equal(train, train2)
  np.testing.assert_array_equal(val, val2)


def test_text_glob_source_splits_by_file(tmp_path):
  files = write_corpus(tmp_path)
  cfg = data_cfg(source="text", glob=str(tmp_path / "**" / "*.txt"), max_bytes=0, seq_len=16)
  tok, train, val = sources.load_splits(cfg)
  rels = sorted(files)
  val_rels = [r for r in rels if sources.is_val_file(r, cfg.val_fraction)]
  train_rels = [r for r in rels if r not in val_rels]
  assert val_rels and train_rels  # 40 files is enough for the hash rule to fill both sides
  assert tok.decode(train).encode() == sources.SEPARATOR.join(files[r] for r in train_rels)
  assert tok.decode(val).encode() == sources.SEPARATOR.join(files[r] for r in val_rels)


def test_text_source_few_files_falls_back_to_tail_split(tmp_path):
  files = write_corpus(tmp_path, n_files=1, size=2000)
  train, val = sources.text_splits(str(tmp_path / "**" / "*.txt"), "byte", 0, 0.1)
  whole = next(iter(files.values()))
  assert len(val) == round(len(whole) * 0.1)
  assert np.concatenate([train, val]).astype(np.uint8).tobytes() == whole


def test_glob_matching_nothing_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match=r"data\.glob.*nothing_here"):
    sources.load_splits(data_cfg(source="text", glob=str(tmp_path / "nothing_here" / "*.txt")))


def test_empty_corpus_is_a_config_error(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ConfigError, match="empty"):
    sources.load_splits(data_cfg(source="text", glob=str(tmp_path / "*.txt")))


def test_seq_len_longer_than_split_is_a_config_error(tmp_path):
  write_corpus(tmp_path, n_files=40, size=50)
  with pytest.raises(ConfigError, match=r"data\.seq_len=4096.*has \d+"):
    sources.load_splits(data_cfg(source="text", glob=str(tmp_path / "**/*.txt"), seq_len=4096))


# ----------------------------------------------------------------------------
# prepare CLI and the tokens source.


def test_prepare_cli_round_trip(tmp_path):
  corpus, out = tmp_path / "corpus", tmp_path / "tok"
  write_corpus(corpus)
  pattern = str(corpus / "**" / "*.txt")
  proc = subprocess.run(
      [sys.executable, "-m", "recursive_lm.data.prepare", "--source", "text", "--glob", pattern,
       "--tokenizer", "byte", "--out", str(out), "--val_fraction", "0.05"],
      cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["dtype"] == "uint16" and summary["vocab_size"] == 256

  cfg = data_cfg(source="tokens", tokens_path=str(out), seq_len=16)
  _, train, val = sources.load_splits(cfg)
  # The streaming prepare's shards, memory-mapped one by one.
  assert train.dtype == np.uint16 and isinstance(train, sources.ShardedTokens)
  ref_train, ref_val = sources.text_splits(pattern, "byte", 200_000, 0.05)
  np.testing.assert_array_equal(train, ref_train)
  np.testing.assert_array_equal(val, ref_val)
  assert (summary["train_tokens"], summary["val_tokens"]) == (len(train), len(val))

  batch = next(pipeline.train_iterator(cfg, seed=0))
  assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (8, 16)

  with pytest.raises(ConfigError, match="data.tokenizer"):
    sources.load_splits(dataclasses.replace(cfg, tokenizer="hf:/x/tokenizer.json"))


def test_tokens_source_missing_dir_names_tokens_path(tmp_path):
  with pytest.raises(ConfigError, match="data.tokens_path"):
    sources.load_splits(data_cfg(source="tokens", tokens_path=str(tmp_path / "missing")))
  with pytest.raises(ConfigError, match="data.tokens_path.*meta.json"):
    sources.load_splits(data_cfg(source="tokens", tokens_path=str(tmp_path)))


def test_token_windows_memmap_pickles_by_reference(tmp_path):
  np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.uint16))
  windows = pipeline.TokenWindows(np.load(tmp_path / "t.npy", mmap_mode="r"), seq_len=9)
  blob = pickle.dumps(windows)
  assert len(blob) < 1000  # the file reference, not 2000 bytes of tokens
  again = pickle.loads(blob)
  assert len(again) == len(windows) == 100
  np.testing.assert_array_equal(again[7], np.arange(70, 80, dtype=np.int32))
  assert again[7].dtype == np.int32


# ----------------------------------------------------------------------------
# Batch pipelines.


def test_targets_are_inputs_shifted_by_one():
  cfg = data_cfg()
  _, train, _ = sources.load_splits(cfg)
  batch = next(pipeline.train_iterator(cfg, seed=3))
  assert batch["inputs"].shape == batch["targets"].shape == (cfg.batch_size, cfg.seq_len)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  width = cfg.seq_len + 1
  starts = {bytes(train[i:i + width].astype(np.uint8)): i for i in range(0, len(train) - width + 1, width)}
  for x, y in zip(batch["inputs"], batch["targets"]):
    window = np.concatenate([x, y[-1:]]).astype(np.uint8).tobytes()
    assert window in starts  # every row is one aligned, non-overlapping window


def test_iterator_state_restore_gives_identical_batches():
  cfg = data_cfg()
  it = pipeline.train_iterator(cfg, seed=7)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what grain.checkpoint writes: plain JSON
  expected = [next(it) for _ in range(3)]
  fresh = pipeline.train_iterator(cfg, seed=7)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  other_seed = next(pipeline.train_iterator(cfg, seed=8))
  assert not np.array_equal(other_seed["inputs"], next(pipeline.train_iterator(cfg, seed=7))["inputs"])


@pytest.mark.parametrize("num_processes", [2, 4])
def test_process_streams_concatenate_to_the_global_batch(num_processes):
  cfg = data_cfg(batch_size=8)
  global_it = pipeline.train_iterator(cfg, seed=1)
  local_its = [pipeline.train_iterator(cfg, seed=1, process_index=p, process_count=num_processes)
               for p in range(num_processes)]
  for _ in range(4):
    want = next(global_it)
    parts = [next(it) for it in local_its]
    assert parts[0]["inputs"].shape == (cfg.batch_size // num_processes, cfg.seq_len)
    for k in want:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k])


def test_batch_size_not_divisible_by_processes_is_a_config_error():
  with pytest.raises(ConfigError, match=r"data\.batch_size=8.*3"):
    pipeline.train_iterator(data_cfg(batch_size=8), seed=0, process_index=0, process_count=3)


def test_first_epoch_is_a_permutation_of_the_windows(tmp_path):
  write_corpus(tmp_path, n_files=1, size=2000)  # about 100 windows of 17
  cfg = data_cfg(source="text", glob=str(tmp_path / "**/*.txt"), seq_len=16, batch_size=4, val_fraction=0.1)
  _, train, _ = sources.load_splits(cfg)
  n = len(pipeline.TokenWindows(train, cfg.seq_len))
  it = pipeline.train_iterator(cfg, seed=0)
  rows = np.concatenate([next(it)["inputs"] for _ in range(-(-n // cfg.batch_size))])[:n]
  want = np.stack([pipeline.TokenWindows(train, cfg.seq_len)[i][:-1] for i in range(n)])
  assert sorted(map(bytes, rows.astype(np.uint8))) == sorted(map(bytes, want.astype(np.uint8)))


def test_eval_batches_are_ordered_wrap_and_shard(tmp_path):
  write_corpus(tmp_path, n_files=1, size=1000)
  cfg = data_cfg(source="text", glob=str(tmp_path / "**/*.txt"), seq_len=16, batch_size=4, val_fraction=0.05)
  _, _, val = sources.load_splits(cfg)
  windows = pipeline.TokenWindows(val, cfg.seq_len)
  assert 1 <= len(windows) < 4  # tiny: every batch wraps
  batches = pipeline.eval_batches(cfg, 3)
  assert len(batches) == 3
  for k, b in enumerate(batches):
    for j in range(cfg.batch_size):
      np.testing.assert_array_equal(b["inputs"][j], windows[(k * cfg.batch_size + j) % len(windows)][:-1])
  halves = [pipeline.eval_batches(cfg, 3, process_index=p, process_count=2) for p in range(2)]
  for k in range(3):
    np.testing.assert_array_equal(np.concatenate([h[k]["targets"] for h in halves]), batches[k]["targets"])


def test_text_split_does_not_depend_on_corpus_location(tmp_path):
  write_corpus(tmp_path / "a")
  os.rename(tmp_path / "a", tmp_path / "moved")
  write_corpus(tmp_path / "a")  # same files again at the original place
  here = sources.text_splits(str(tmp_path / "a" / "**" / "*.txt"), "byte", 0, 0.05)
  there = sources.text_splits(str(tmp_path / "moved" / "**" / "*.txt"), "byte", 0, 0.05)
  for x, y in zip(here, there):
    np.testing.assert_array_equal(x, y)


def test_iterator_restores_through_an_orbax_manager(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain  # pylint: disable=g-import-not-at-top
  cfg = data_cfg()
  it = pipeline.train_iterator(cfg, seed=0)
  for _ in range(5):
    next(it)
  mngr = ocp.CheckpointManager(tmp_path, item_names=("data_iter",))
  mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = next(it)
  fresh = pipeline.train_iterator(cfg, seed=0)
  mngr.restore(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  got = next(fresh)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
