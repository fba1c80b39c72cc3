"""Document files: JSONL, Parquet and ArrayRecord corpora matched by a glob.

What a document is, per `data.source`:
  jsonl        one line of a .jsonl file (also .jsonl.gz through gzip and
               .jsonl.zst through zstandard, both read as streams): a JSON
               object whose `data.text_field` is a string. Blank lines are
               skipped.
  parquet      one row of a Parquet file: its `data.text_field` column (string
               or binary). Files are read one row group at a time, in batches,
               never whole.
  arrayrecord  one record of an ArrayRecord file: the record's bytes are the
               document's UTF-8 text (not JSON, no field).

A document's identity is "STEM#INDEX": STEM is the file's relpath (as for the
text source: relative to the glob's leading non-wildcard directory) without its
format and compression suffixes, INDEX the document's position in its file
(0-based, blank JSONL lines not counted). The split hashes that identity with
the text source's rule (`sources.is_val_file`), so a document's side depends on
nothing else: adding or removing files never moves another document, and the
same file converted to another of these formats or compressed keeps every
document on its side.

Text that is not UTF-8 (bytes of a JSONL line, a binary Parquet value, an
ArrayRecord record, or a JSON string holding a lone surrogate) is replaced
with U+FFFD (`data.decode_errors='replace'`, counted in DecodeCount) or refused
with a ConfigError naming the file and line / row group / record ('refuse').

Keep this module free of import-time side effects: prepare's worker processes
import it.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
from typing import Iterator

from recursive_lm.config import ConfigError

FORMATS = ("jsonl", "parquet", "arrayrecord")
DECODE_ERRORS = ("replace", "refuse")
_COMPRESSION = (".gz", ".zst", ".zstd")
_SUFFIXES = {"jsonl": (".jsonl", ".json", ".ndjson"), "parquet": (".parquet", ".pq"),
             "arrayrecord": (".arrayrecord", ".array_record")}
_PARQUET_BATCH = 1024  # rows per Arrow batch: bounds memory even for a huge row group
_RECORD_CHUNK = 256    # ArrayRecord records read per call


@dataclasses.dataclass
class DecodeCount:
  """Documents whose text was not valid UTF-8 and had bytes replaced."""
  replaced: int = 0


def identity_stem(relpath: str) -> str:
  """relpath without its compression and format suffixes: 'a/b.jsonl.gz' -> 'a/b'."""
  stem = relpath
  for suffix in _COMPRESSION:
    if stem.endswith(suffix):
      stem = stem[:-len(suffix)]
      break
  for suffixes in _SUFFIXES.values():
    for suffix in suffixes:
      if stem.endswith(suffix):
        return stem[:-len(suffix)]
  return stem


def identity(relpath: str, index: int) -> str:
  """The string the split rule hashes for document `index` of file `relpath`."""
  return f"{identity_stem(relpath)}#{index}"


def _decode(raw: bytes, where: str, errors: str, count: DecodeCount) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if errors == "refuse":
      raise ConfigError(f"{where}: not UTF-8 at byte {e.start} (data.decode_errors='refuse'; 'replace' "
                        "replaces such bytes with U+FFFD)") from None
    count.replaced += 1
    return raw.decode("utf-8", errors="replace")


def _utf8(text: str, where: str, errors: str, count: DecodeCount) -> bytes:
  """str -> UTF-8 bytes; a lone surrogate (from a JSON \\udXXX escape) is not encodable."""
  try:
    return text.encode("utf-8")
  except UnicodeEncodeError:
    if errors == "refuse":
      raise ConfigError(f"{where}: text holds a lone surrogate, not encodable as UTF-8 "
                        "(data.decode_errors='refuse')") from None
    count.replaced += 1
    return text.encode("utf-8", errors="replace")


def _open_stream(path: str):
  """A binary, line-iterable stream of the decompressed file."""
  if path.endswith(".gz"):
    return gzip.open(path, "rb")
  if path.endswith((".zst", ".zstd")):
    import zstandard  # pylint: disable=g-import-not-at-top
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
  return open(path, "rb")


def _stream_errors() -> tuple:
  try:
    import zstandard  # pylint: disable=g-import-not-at-top
    return (OSError, EOFError, zstandard.ZstdError)  # ZstdError is not an OSError
  except ImportError:
    return (OSError, EOFError)


def jsonl_documents(path: str, field: str, errors: str, count: DecodeCount) -> Iterator[bytes]:
  """UTF-8 text of each document of a JSONL file, in order (streamed line by line)."""
  lineno = 0
  try:
    with _open_stream(path) as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        where = f"{path}:{lineno}"
        try:
          obj = json.loads(_decode(line, where, errors, count))
        except json.JSONDecodeError as e:
          raise ConfigError(f"{where}: not a JSON line ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or field not in obj:
          raise ConfigError(f"{where}: no text field {field!r} (data.text_field)")
        text = obj[field]
        if not isinstance(text, str):
          raise ConfigError(f"{where}: text field {field!r} is {type(text).__name__}, not a string")
        yield _utf8(text, where, errors, count)
  except _stream_errors() as e:  # a truncated or corrupt gzip / zstd stream
    raise ConfigError(f"{path}: cannot be read after line {lineno} ({type(e).__name__}: {e})") from None


def parquet_documents(path: str, field: str, errors: str, count: DecodeCount) -> Iterator[bytes]:
  """UTF-8 text of each row's `field` column, row group by row group, in batches."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    pf = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise ConfigError(f"{path}: not a Parquet file ({e})") from None
  with pf:
    names = pf.schema_arrow.names
    if field not in names:
      raise ConfigError(f"{path}: no text column {field!r} (data.text_field; columns: {names})")
    kind = pf.schema_arrow.field(field).type
    binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not (binary or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      raise ConfigError(f"{path}: text column {field!r} is {kind}, not string or binary")
    for rg in range(pf.num_row_groups):
      row = 0
      try:
        batches = pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[rg], columns=[field])
        for batch in batches:
          for value in batch.column(0).to_pylist():
            where = f"{path}: row group {rg}, row {row}"
            if value is None:
              raise ConfigError(f"{where}: text column {field!r} is null")
            yield _decode(value, where, errors, count) if binary else _utf8(value, where, errors, count)
            row += 1
      except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: row group {rg} cannot be read ({e})") from None


def arrayrecord_documents(path: str, errors: str, count: DecodeCount) -> Iterator[bytes]:
  """Each record's bytes (UTF-8 text, checked), in order, a chunk of records at a time."""
  from array_record.python import array_record_module as ar  # pylint: disable=g-import-not-at-top
  try:
    reader = ar.ArrayRecordReader(path)
  except (RuntimeError, OSError, ValueError) as e:
    raise ConfigError(f"{path}: not an ArrayRecord file ({e})") from None
  try:
    n = reader.num_records()
    for start in range(0, n, _RECORD_CHUNK):
      try:
        records = reader.read(start, min(n, start + _RECORD_CHUNK))
      except (RuntimeError, OSError, ValueError) as e:
        raise ConfigError(f"{path}: records {start}.. cannot be read ({e})") from None
      for i, raw in enumerate(records, start=start):
        yield _decode(raw, f"{path}: record {i}", errors, count).encode("utf-8")
  finally:
    reader.close()


def file_documents(source: str, path: str, field: str, errors: str, count: DecodeCount) -> Iterator[bytes]:
  """The UTF-8 text of every document of one file of `source`, in file order."""
  if errors not in DECODE_ERRORS:
    raise ConfigError(f"data.decode_errors={errors!r} is not one of {list(DECODE_ERRORS)}")
  if source == "jsonl":
    return jsonl_documents(path, field, errors, count)
  if source == "parquet":
    return parquet_documents(path, field, errors, count)
  if source == "arrayrecord":
    return arrayrecord_documents(path, errors, count)
  raise ConfigError(f"data.source={source!r} is not one of {list(FORMATS)}")


def documents(source: str, files, field: str, errors: str, count: DecodeCount) -> Iterator[tuple[str, bytes]]:
  """(identity, UTF-8 text) of every document of `files` ((relpath, path) pairs), in order."""
  for rel, path in files:
    for i, text in enumerate(file_documents(source, path, field, errors, count)):
      yield identity(rel, i), text
