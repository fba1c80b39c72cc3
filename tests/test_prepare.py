"""The streaming prepare (recursive_lm/data/prepare.py): shards, resume, lock, refusals, memory-mapped reads."""

import json
import os
import copy
import subprocess
import sys

import numpy as np
import pytest

from recursive_lm.config import ConfigError
from recursive_lm.data import pipeline, prepare, sources
from test_documents import make_docs, write_docs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_prepare(*args, env=None, timeout=120):
  return subprocess.run([sys.executable, "-m", "recursive_lm.data.prepare", *map(str, args)], cwd=REPO,
                        env={**os.environ, "PYTHONPATH": REPO, **(env or {})}, capture_output=True, text=True,
                        timeout=timeout, check=False)


def shard_bytes(out):
  return {f"{side}/{n}": open(os.path.join(out, side, n), "rb").read()
          for side in ("train", "val") for n in sorted(os.listdir(os.path.join(out, side)))}


@pytest.fixture
def corpus(tmp_path):
  return write_docs(tmp_path / "corpus", make_docs(n_files=6, per_file=40), "jsonl.gz")


def test_shards_equal_the_in_memory_split_with_two_workers(tmp_path, corpus):
  out = tmp_path / "tok"
  proc = run_prepare("--source", "jsonl", "--glob", corpus, "--out", out, "--val_fraction", 0.2,
                     "--workers", 2, "--shard_bytes", 500)
  assert proc.returncode == 0, proc.stderr
  assert "prepare: 6/6 units" in proc.stderr and "tok/s" in proc.stderr and "eta" in proc.stderr
  meta = json.loads((out / "meta.json").read_text())
  assert len(meta["shards"]["train"]) == 6 and meta["documents"] == 240
  train, val = sources.tokens_splits(str(out))
  ref_train, ref_val = sources.document_splits("jsonl", corpus, "byte", 0, 0.2, "text", "replace")
  np.testing.assert_array_equal(np.asarray(train), ref_train)
  np.testing.assert_array_equal(np.asarray(val), ref_val)
  # Windows across shard boundaries read the same tokens as from one array, also after a copy through
  # __reduce__ (how grain's worker processes receive the source; the project loads no pickle itself).
  windows = copy.deepcopy(pipeline.TokenWindows(train, 33))
  ref = pipeline.TokenWindows(ref_train, 33)
  assert len(windows) == len(ref)
  for i in range(len(ref)):
    np.testing.assert_array_equal(windows[i], ref[i])


def test_killed_prepare_resumes_to_identical_shards(tmp_path, corpus):
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  args = ("--source", "jsonl", "--glob", corpus, "--val_fraction", 0.2, "--workers", 1, "--shard_bytes", 500)
  assert run_prepare(*args, "--out", whole).returncode == 0
  crashed = run_prepare(*args, "--out", resumed, env={"RLM_PREPARE_CRASH_AFTER_UNITS": "2"})
  assert crashed.returncode == 9
  assert not (resumed / "meta.json").exists()  # never read as complete
  done = json.loads((resumed / "progress.json").read_text())["done"]
  assert sorted(done) == ["0", "1"]
  # A half-written shard of the unit in flight is what a kill leaves behind; resume discards it.
  (resumed / "train" / "00002.bin.tmp").write_bytes(b"\x01\x02partial")
  with pytest.raises(ConfigError, match="meta.json"):
    sources.tokens_splits(str(resumed))
  proc = run_prepare(*args, "--out", resumed)
  assert proc.returncode == 0, proc.stderr
  assert "prepare: 4/6 units" in proc.stderr  # only the unfinished units were done again
  assert shard_bytes(resumed) == shard_bytes(whole)


def test_other_tokenizer_or_settings_in_out_are_refused(tmp_path, corpus):
  out = tmp_path / "tok"
  assert run_prepare("--source", "jsonl", "--glob", corpus, "--out", out, "--workers", 1).returncode == 0
  hf = tmp_path / "t.json"
  from tokenizers import Tokenizer, models
  Tokenizer(models.BPE()).save(str(hf))
  proc = run_prepare("--source", "jsonl", "--glob", corpus, "--out", out, "--tokenizer", f"hf:{hf}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: --out={out} was prepared with tokenizer 'byte', not 'hf:{hf}'; choose another --out or remove it"]
  proc = run_prepare("--source", "jsonl", "--glob", corpus, "--out", out, "--val_fraction", 0.3)
  assert proc.returncode == 2 and "val_fraction=0.05" in proc.stderr


def test_second_prepare_on_the_same_out_is_refused(tmp_path, corpus):
  from recursive_lm import workdir_lock
  out = tmp_path / "tok"
  held = workdir_lock.WorkdirLock(str(out))  # a first prepare still running
  try:
    proc = run_prepare("--source", "jsonl", "--glob", corpus, "--out", out)
  finally:
    held.release()
  assert proc.returncode == 2 and "in use by process" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not (out / "train").exists()


def test_bad_corpus_is_one_error_line(tmp_path):
  (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
  proc = run_prepare("--source", "jsonl", "--glob", tmp_path / "*.jsonl", "--out", tmp_path / "o")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.jsonl'}:2: no text field 'text' (data.text_field)"]


def test_train_tokenizer_saves_a_bpe_that_training_reads(tmp_path, corpus):
  out = tmp_path / "tok"
  proc = run_prepare("--source", "jsonl", "--glob", corpus, "--out", out, "--val_fraction", 0.2,
                     "--train_tokenizer", 300, "--workers", 1)
  assert proc.returncode == 0, proc.stderr
  spec = f"hf:{out.resolve() / 'tokenizer.json'}"
  meta = json.loads((out / "meta.json").read_text())
  assert meta["tokenizer"] == spec and meta["vocab_size"] == 300 and not meta["is_byte_level"]
  from recursive_lm.data import tokenizers
  tok = tokenizers.get_tokenizer(spec)
  text = "merged pieces é, and bytes \u2603 never seen"
  assert tok.decode(tok.encode(text)) == text  # byte-level: lossless on any text
  train, val = sources.tokens_splits(str(out))
  byte_train, byte_val = sources.document_splits("jsonl", corpus, "byte", 0, 0.2, "text", "replace")
  assert len(train) < len(byte_train)  # merges: fewer tokens than bytes (random letters: few)
  # The same documents on the same sides, joined the same way.
  assert tok.decode(np.asarray(train)) == tokenizers.ByteTokenizer().decode(byte_train)
  assert tok.decode(np.asarray(val)) == tokenizers.ByteTokenizer().decode(byte_val)
  import dataclasses
  from test_documents import data_cfg
  cfg = data_cfg(source="tokens", tokens_path=str(out), tokenizer=spec)
  assert next(pipeline.train_iterator(cfg, seed=0))["inputs"].max() < 300
  with pytest.raises(ConfigError, match=r"data.tokenizer='byte'.*set data.tokenizer="):
    sources.load_splits(dataclasses.replace(cfg, tokenizer="byte"))
  again = run_prepare("--source", "jsonl", "--glob", corpus, "--out", out, "--val_fraction", 0.2,
                      "--train_tokenizer", 300, "--workers", 1)
  assert again.returncode == 0, again.stderr  # a finished directory: same tokenizer, nothing redone
