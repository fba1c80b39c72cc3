"""Document sources (recursive_lm/data/documents.py): JSONL (plain, gzip, zstd), Parquet, ArrayRecord."""

import dataclasses
import gzip
import json
import os

import numpy as np
import pytest

from recursive_lm import config as config_lib
from recursive_lm.config import ConfigError, DataConfig
from recursive_lm.data import documents, sources

FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrayrecord"]


def data_cfg(**overrides) -> DataConfig:
  d = config_lib.base_config().data
  base = DataConfig(**{f.name: d[f.name] for f in dataclasses.fields(DataConfig)})
  return dataclasses.replace(base, **{"seq_len": 16, "batch_size": 4, "val_fraction": 0.2, **overrides})


def make_docs(n_files=4, per_file=30, seed=0):
  """{stem: [text, ...]}: short documents with some non-ASCII text."""
  rng = np.random.default_rng(seed)
  out = {}
  for f in range(n_files):
    out[f"part/s{f:02d}"] = [
        "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, int(rng.integers(5, 60)))) + f" é{f}.{i}"
        for i in range(per_file)]
  return out


def write_docs(root, docs: dict, fmt: str, field="text", raw=None):
  """Write each stem's documents as ROOT/STEM.FMT; `raw` maps stem -> list of bytes records (overrides)."""
  for stem, texts in docs.items():
    path = os.path.join(root, f"{stem}.{fmt}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if fmt.startswith("jsonl"):
      lines = b"".join(json.dumps({field: t, "id": i}).encode() + b"\n" for i, t in enumerate(texts))
      if fmt.endswith(".gz"):
        lines = gzip.compress(lines)
      elif fmt.endswith(".zst"):
        import zstandard
        lines = zstandard.ZstdCompressor().compress(lines)
      with open(path, "wb") as f:
        f.write(lines)
    elif fmt == "parquet":
      import pyarrow as pa
      import pyarrow.parquet as pq
      pq.write_table(pa.table({"id": list(range(len(texts))), field: texts}), path, row_group_size=7)
    elif fmt == "arrayrecord":
      from array_record.python import array_record_module as ar
      w = ar.ArrayRecordWriter(path, "group_size:4")
      for t in (raw or {}).get(stem) or [t.encode() for t in texts]:
        w.write(t)
      w.close()
  return os.path.join(str(root), "**", f"*.{fmt}")


def source_of(fmt):
  return fmt.split(".")[0]


def splits(pattern, fmt, **kw):
  args = dict(tokenizer="byte", max_bytes=0, val_fraction=0.2, text_field="text", decode_errors="replace")
  args.update(kw)
  return sources.document_splits(source_of(fmt), pattern, **args)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_tokens(tmp_path, fmt):
  docs = make_docs()
  ref_pattern = write_docs(tmp_path / "ref", docs, "jsonl")
  pattern = write_docs(tmp_path / fmt.replace(".", "_"), docs, fmt)
  train, val = splits(pattern, fmt)
  ref_train, ref_val = splits(ref_pattern, "jsonl")
  np.testing.assert_array_equal(train, ref_train)
  np.testing.assert_array_equal(val, ref_val)
  # And the tokens are the documents, each on the side its identity hashes to, joined by the separator.
  keys = [(documents.identity(f"{stem}.{fmt}", i), t) for stem in sorted(docs) for i, t in enumerate(docs[stem])]
  want_val = sources.SEPARATOR.join(t.encode() for k, t in keys if sources.is_val_file(k, 0.2))
  want_train = sources.SEPARATOR.join(t.encode() for k, t in keys if not sources.is_val_file(k, 0.2))
  assert 0 < len(want_val) < len(want_train)
  assert val.astype(np.uint8).tobytes() == want_val
  assert train.astype(np.uint8).tobytes() == want_train


def test_adding_files_moves_no_document_across_the_split(tmp_path):
  docs = make_docs(n_files=3)
  pattern = write_docs(tmp_path, docs, "jsonl")
  _, val = splits(pattern, "jsonl")
  more = make_docs(n_files=5, seed=1)
  write_docs(tmp_path, {"part/a_first": more["part/s00"], "part/s99": more["part/s01"]}, "jsonl")
  sources.document_splits.cache_clear()
  _, val2 = splits(pattern, "jsonl")
  old = set(val.astype(np.uint8).tobytes().split(sources.SEPARATOR))
  new = set(val2.astype(np.uint8).tobytes().split(sources.SEPARATOR))
  assert old < new  # every old validation document stays; new files add their own


def test_load_splits_and_the_batch_pipeline_read_jsonl(tmp_path):
  pattern = write_docs(tmp_path, make_docs(), "jsonl.zst")
  cfg = data_cfg(source="jsonl", glob=pattern)
  from recursive_lm.data import pipeline
  batch = next(pipeline.train_iterator(cfg, seed=0))
  assert batch["inputs"].shape == (4, 16) and batch["inputs"].dtype == np.int32
  with pytest.raises(ConfigError, match="data.glob"):
    sources.load_splits(data_cfg(source="parquet", glob=""))


def test_text_field_names_the_column(tmp_path):
  docs = make_docs(n_files=2)
  a = write_docs(tmp_path / "a", docs, "parquet", field="content")
  b = write_docs(tmp_path / "b", docs, "jsonl")
  np.testing.assert_array_equal(splits(a, "parquet", text_field="content")[0], splits(b, "jsonl")[0])


def test_invalid_input_is_one_line_naming_file_and_place(tmp_path):
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "x.jsonl").write_bytes(b'{"text": "ok"}\n\n{"text": "ok" oops\n')
  with pytest.raises(ConfigError, match=r"x\.jsonl:3: not a JSON line"):
    splits(str(bad / "*.jsonl"), "jsonl")
  (bad / "x.jsonl").write_bytes(b'{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(ConfigError, match=r"x\.jsonl:2: no text field 'text'"):
    splits(str(bad / "*.jsonl"), "jsonl")
  (bad / "x.jsonl").write_bytes(b'{"text": 3}\n')
  with pytest.raises(ConfigError, match=r"x\.jsonl:1: text field 'text' is int"):
    splits(str(bad / "*.jsonl"), "jsonl")
  (bad / "y.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n' * 100)[:-20])
  with pytest.raises(ConfigError, match=r"y\.jsonl\.gz: cannot be read"):
    splits(str(bad / "*.jsonl.gz"), "jsonl")
  p = write_docs(tmp_path / "pq", make_docs(n_files=1), "parquet")
  with pytest.raises(ConfigError, match=r"s00\.parquet: no text column 'body'"):
    splits(p, "parquet", text_field="body")
  (bad / "z.parquet").write_bytes(b"not parquet at all")
  with pytest.raises(ConfigError, match=r"z\.parquet: not a Parquet file"):
    splits(str(bad / "*.parquet"), "parquet")
  (bad / "e.jsonl").write_bytes(b"")
  with pytest.raises(ConfigError, match="empty"):
    splits(str(bad / "e.jsonl"), "jsonl")
  with pytest.raises(ConfigError, match="matches no files"):
    splits(str(bad / "none*.jsonl"), "jsonl")


def test_non_utf8_documents_are_replaced_and_counted_or_refused(tmp_path, capsys):
  texts = [f"document number {i} " * 3 for i in range(20)]
  raw = [t.encode() for t in texts]
  raw[3] = b"caf\xe9 latin-1 " * 3
  raw[7] = b"\xff\xfe broken"
  pattern = write_docs(tmp_path, {"r": texts}, "arrayrecord", raw={"r": raw})
  train, val = splits(pattern, "arrayrecord")
  joined = np.concatenate([train, val]).astype(np.uint8).tobytes().decode()
  assert "caf\ufffd latin-1" in joined and "\ufffd\ufffd broken" in joined
  assert "2 documents were not UTF-8" in capsys.readouterr().err
  sources.document_splits.cache_clear()
  with pytest.raises(ConfigError, match=r"r\.arrayrecord: record 3: not UTF-8 at byte 3"):
    splits(pattern, "arrayrecord", decode_errors="refuse")
  (tmp_path / "j.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(ConfigError, match=r"j\.jsonl:2: not UTF-8"):
    splits(str(tmp_path / "j.jsonl"), "jsonl", decode_errors="refuse")


def test_identity_ignores_format_and_compression():
  assert documents.identity("a/b.jsonl.zst", 3) == documents.identity("a/b.parquet", 3) == "a/b#3"
  assert documents.identity("a/b.txt", 0) == "a/b.txt#0"
