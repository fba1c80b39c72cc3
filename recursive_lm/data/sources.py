"""Corpora as (train_tokens, val_tokens) pairs of 1-D token arrays.

The sources, picked by `data.source`:
  stdlib  the .py files of the running interpreter's standard library: about
          11 MB of real text on every machine, no download. Deterministic for a
          given Python build (a different Python version is a different corpus).
  text    UTF-8 files matched by `data.glob` (recursive ** allowed).
  jsonl, parquet, arrayrecord
          documents of the files matched by `data.glob` (recursive_lm/data/
          documents.py says what a document is); rules 1-5 below apply with
          documents in place of files and the document's identity
          ("STEM#INDEX") in place of relpath. Held in memory like text; for
          corpora larger than memory, prepare them (data.prepare) first.
  tokens  a directory written by `python -m recursive_lm.data.prepare`:
          train.npy, val.npy (uint16 or int32, opened as read-only memmaps) and
          meta.json (tokenizer spec, vocab size, document frame of rule 5).

The split rule (stdlib and text), chosen so that adding, removing or capping
files never moves another file across the split:
  1. A file goes to validation when crc32(relpath) % 1000 < round(val_fraction
     * 1000); relpath is POSIX-style, relative to the stdlib root or to the
     glob's leading non-wildcard directory (so moving a corpus keeps its split).
  2. Each side lists its files sorted by relpath and joins them with "\\n\\n".
  3. max_bytes > 0 caps the bytes read: validation gets round(max_bytes *
     val_fraction) (at least 1), train the rest, each taken from the front of
     its sorted list (the last file cut short).
  4. Fallback for corpora too small for rule 1 to put a file on each side
     (e.g. a handful of files): all files, sorted and joined and capped at
     max_bytes, are cut so the last val_fraction of the bytes is validation
     (each side is then one document).
  5. Tokenizers that expect BOS (a pretrained model's, `add_bos`) get each
     document as BOS + text + EOS (EOS when the tokenizer has one) with no
     blank line between, the way such models saw documents in pretraining;
     every other tokenizer gets the documents joined by "\n\n" as in rule 2.

Tokenization is cached per process (lru_cache on the arguments) because the
stdlib corpus takes a noticeable fraction of a second even as bytes. Cached
arrays are read-only so one caller cannot corrupt another's data.
"""

from __future__ import annotations

import dataclasses
import functools
import glob as glob_lib
import json
import os
import re
import sys
import sysconfig
import zlib
from pathlib import Path, PurePath

import numpy as np

from recursive_lm.config import ConfigError, DataConfig
from recursive_lm.data import documents as documents_lib
from recursive_lm.data.tokenizers import document_frame, get_tokenizer

SEPARATOR = b"\n\n"
SPLIT_BUCKETS = 1000
META_FILE, TRAIN_FILE, VAL_FILE = "meta.json", "train.npy", "val.npy"

# Directories left out of the stdlib corpus: installed packages vary by machine,
# tests and idlelib/lib2to3 are large and unlike ordinary code (fixtures, odd
# encodings, grammar tables), config-* holds build files.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                               "__pycache__"})
_GLOB_MAGIC = re.compile(r"[*?[]")

Files = list[tuple[str, str]]  # (relpath for hashing and order, path to read)


# ----------------------------------------------------------------------------
# File lists.


def stdlib_files() -> Files:
  """The stdlib .py files, sorted by relpath."""
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(("config-", "."))]
    for name in filenames:
      # _sysconfigdata*.py records this build's paths and compiler flags.
      if name.endswith(".py") and not name.startswith("_sysconfigdata"):
        path = os.path.join(dirpath, name)
        out.append((PurePath(os.path.relpath(path, root)).as_posix(), path))
  return sorted(out)


def _glob_root(pattern: str) -> str:
  """The directory part of `pattern` before its first wildcard component."""
  parts = pattern.split(os.sep)[:-1]  # the last component names files, never the root
  keep = []
  for part in parts:
    if _GLOB_MAGIC.search(part):
      break
    keep.append(part)
  if keep == [""]:
    return os.sep  # "/*.txt"
  return os.sep.join(keep) or "."


def text_files(pattern: str) -> Files:
  """Regular files matched by `pattern` (** recursive), sorted by relpath."""
  pattern = os.path.expanduser(pattern)
  matches = [p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p)]
  if not matches:
    raise ConfigError(f"data.glob={pattern!r} matches no files")
  root = _glob_root(pattern)
  return sorted((PurePath(os.path.relpath(p, root)).as_posix(), p) for p in matches)


def is_val_file(relpath: str, val_fraction: float) -> bool:
  """Rule 1 of the module docstring: a stable hash of the relative path."""
  return zlib.crc32(relpath.encode("utf-8")) % SPLIT_BUCKETS < round(val_fraction * SPLIT_BUCKETS)


# ----------------------------------------------------------------------------
# Reading and tokenizing.


class _Capped:
  """The pieces one side keeps: taken in order while len(SEPARATOR.join(pieces)) <= cap (None: no cap).

  Empty pieces are skipped so they add no stray separators; the piece that
  reaches the cap is cut short.
  """

  def __init__(self, cap: int | None):
    self.cap, self.pieces, self.used = cap, [], 0

  @property
  def full(self) -> bool:
    return self.cap is not None and self.used + (len(SEPARATOR) if self.pieces else 0) >= self.cap

  def add(self, data: bytes) -> None:
    if not data:
      return
    if self.pieces:
      self.used += len(SEPARATOR)
    if self.cap is not None:
      data = data[:self.cap - self.used]
    self.pieces.append(data)
    self.used += len(data)


def split_pieces(items, max_bytes: int, val_fraction: float):
  """Rules 1-4 over `items()`: a callable returning an iterable of (identity, read) in sorted order, where
  read() -> bytes. Returns (train pieces, val pieces, number of items seen) (lists of bytes).

  A piece is read only when its side still takes it, and iteration stops once both capped sides are full,
  so capped corpora read only their front. `items` is called a second time only for rule 4's fallback.
  """
  cap = max_bytes or None
  val_cap = max(1, round(max_bytes * val_fraction)) if cap else None
  train_cap = max(0, max_bytes - val_cap) if cap else None
  sides = {False: _Capped(train_cap), True: _Capped(val_cap)}
  seen = {False: 0, True: 0}
  for key, read in items():
    side = is_val_file(key, val_fraction)
    seen[side] += 1
    if not sides[side].full:
      sides[side].add(read())
    if cap and all(seen.values()) and all(s.full for s in sides.values()):
      break
  if all(seen.values()):
    return sides[False].pieces, sides[True].pieces, sum(seen.values())
  # Rule 4: one side got nothing; cut the tail of the whole (capped) corpus.
  whole = _Capped(cap)
  for _, read in items():
    if whole.full:
      break
    whole.add(read())
  joined = SEPARATOR.join(whole.pieces)
  cut = len(joined) - max(1, round(len(joined) * val_fraction))
  return [joined[:cut]], [joined[cut:]], sum(seen.values())


def _tokenize(pieces: list[bytes], spec: str) -> np.ndarray:
  """Documents -> read-only int32 [N] (rule 5 of the module docstring)."""
  tok = get_tokenizer(spec)
  first, last = document_frame(tok)
  if tok.is_byte_level:
    # Raw bytes are the tokens: no decode/encode round trip, and non-UTF-8
    # bytes survive exactly.
    ids = np.frombuffer(SEPARATOR.join(pieces), dtype=np.uint8).astype(np.int32)
  else:
    # One encode call per document keeps each call bounded on big corpora.
    sep = tok.encode(SEPARATOR.decode())
    head = np.asarray([first] if first is not None else [], np.int32)
    tail = np.asarray([last] if last is not None else [], np.int32)
    parts = []
    for i, piece in enumerate(pieces):
      if i and first is None:
        parts.append(sep)
      parts += [head, tok.encode(piece.decode("utf-8", errors="replace")), tail]
    ids = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
  ids.setflags(write=False)
  return ids


def _split_and_tokenize(files: Files, spec: str, max_bytes: int, val_fraction: float, what: str):
  """Apply the split rule (module docstring) to `files`; `what` names the source in errors."""
  items = lambda: ((rel, lambda p=p: Path(p).read_bytes()) for rel, p in files)  # noqa: E731
  train, val, _ = split_pieces(items, max_bytes, val_fraction)
  if not any(train) and not any(val):
    raise ConfigError(f"{what}: the corpus is empty ({len(files)} files, all empty)")
  return _tokenize(train, spec), _tokenize(val, spec)


@functools.lru_cache(maxsize=8)
def stdlib_splits(tokenizer: str = "byte", max_bytes: int = 0, val_fraction: float = 0.05):
  """-> (train int32 [N_train], val int32 [N_val]) from the stdlib corpus (cached)."""
  return _split_and_tokenize(stdlib_files(), tokenizer, max_bytes, val_fraction,
                             f"data.source='stdlib' ({sysconfig.get_paths()['stdlib']})")


@functools.lru_cache(maxsize=8)
def text_splits(pattern: str, tokenizer: str = "byte", max_bytes: int = 0, val_fraction: float = 0.05):
  """-> (train int32 [N_train], val int32 [N_val]) from the files matching `pattern` (cached).

  The cache assumes the files do not change during the process.
  """
  return _split_and_tokenize(text_files(pattern), tokenizer, max_bytes, val_fraction, f"data.glob={pattern!r}")


@functools.lru_cache(maxsize=8)
def document_splits(source: str, pattern: str, tokenizer: str = "byte", max_bytes: int = 0,
                    val_fraction: float = 0.05, text_field: str = "text", decode_errors: str = "replace"):
  """-> (train int32 [N_train], val int32 [N_val]) from the jsonl / parquet / arrayrecord files matching
  `pattern` (cached; the files are read as streams, the tokens held in memory).

  Non-UTF-8 documents are replaced or refused per `decode_errors`; replaced ones are counted in the
  warning printed to stderr.
  """
  files = text_files(pattern)
  count = documents_lib.DecodeCount()
  items = lambda: ((key, lambda t=text: t)  # noqa: E731
                   for key, text in documents_lib.documents(source, files, text_field, decode_errors, count))
  train, val, n = split_pieces(items, max_bytes, val_fraction)
  what = f"data.source={source!r} data.glob={pattern!r}"
  if not any(train) and not any(val):
    raise ConfigError(f"{what}: the corpus is empty ({len(files)} files, {n} documents, all empty)")
  if count.replaced:
    print(f"warning: {what}: {count.replaced} documents were not UTF-8; their bad bytes became U+FFFD "
          "(data.decode_errors='refuse' refuses them)", file=sys.stderr, flush=True)
  return _tokenize(train, tokenizer), _tokenize(val, tokenizer)


# ----------------------------------------------------------------------------
# Prepared token directories.


def read_meta(tokens_path: str) -> dict:
  """meta.json of a prepared directory; ConfigError naming data.tokens_path if absent."""
  path = os.path.join(tokens_path, META_FILE)
  if not os.path.isfile(path):
    raise ConfigError(f"data.tokens_path={tokens_path!r}: {META_FILE} not found "
                      "(write it with python -m recursive_lm.data.prepare)")
  with open(path) as f:
    return json.load(f)


def _load_npy(tokens_path: str, name: str) -> np.ndarray:
  path = os.path.join(tokens_path, name)
  if not os.path.isfile(path):
    raise ConfigError(f"data.tokens_path={tokens_path!r}: {name} not found")
  arr = np.load(path, mmap_mode="r", allow_pickle=False)  # read-only memmap: nothing loads until indexed
  if arr.ndim != 1 or arr.dtype not in (np.uint16, np.int32):
    raise ConfigError(f"data.tokens_path={tokens_path!r}: {name} is {arr.dtype} {arr.shape}, "
                      "expected 1-D uint16 or int32")
  return arr


class ShardedTokens:
  """The 1-D concatenation of raw token shards, each a read-only np.memmap, minus the first `skip` tokens.

  Behaves as a 1-D array where TokenWindows needs it (len, dtype, ndim, slices ->
  np.ndarray [n]); a slice reads only the shards it covers, so a host reading its
  own windows touches only those pages. Pickles by file name (grain workers).
  """

  ndim = 1

  def __init__(self, paths: list[str], lengths: list[int], dtype: str, skip: int = 0):
    self.paths, self.lengths, self.dtype, self.skip = list(paths), [int(n) for n in lengths], np.dtype(dtype), skip
    self._starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
    self._maps = None

  def _open(self):
    if self._maps is None:
      self._maps = [np.memmap(p, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
                    for p, n in zip(self.paths, self.lengths)]
    return self._maps

  def __len__(self) -> int:
    return max(0, int(self._starts[-1]) - self.skip)

  def __getitem__(self, key) -> np.ndarray:
    if not isinstance(key, slice):
      raise TypeError("ShardedTokens takes slices")
    start, stop, step = key.indices(len(self))
    if step != 1:
      raise ValueError("ShardedTokens slices have step 1")
    start, stop = start + self.skip, max(start, stop) + self.skip
    first = int(np.searchsorted(self._starts, start, side="right")) - 1
    parts = []
    for i in range(max(first, 0), len(self.lengths)):
      lo, hi = self._starts[i], self._starts[i + 1]
      if lo >= stop:
        break
      parts.append(self._open()[i][max(start, lo) - lo:min(stop, hi) - lo])
    return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

  def __array__(self, dtype=None, copy=None):
    out = self[:]
    return out.astype(dtype) if dtype is not None else out

  def __getstate__(self):
    return {**self.__dict__, "_maps": None}


def _load_shards(tokens_path: str, meta: dict, side: str) -> ShardedTokens:
  paths, lengths = [], []
  for rel, n in meta["shards"][side]:
    path = os.path.join(tokens_path, rel)
    if not os.path.isfile(path) or os.path.getsize(path) != n * np.dtype(meta["dtype"]).itemsize:
      raise ConfigError(f"data.tokens_path={tokens_path!r}: shard {rel} is missing or not {n} tokens long; "
                        "prepare it again")
    paths.append(path)
    lengths.append(n)
  return ShardedTokens(paths, lengths, meta["dtype"], meta.get("skip_first", 0))


@functools.lru_cache(maxsize=8)
def tokens_splits(tokens_path: str):
  """-> (train [N_train], val [N_val]) read-only memmaps (train.npy / val.npy) or ShardedTokens (the
  streaming prepare's shards) in the stored dtype (uint16 or int32).

  TokenWindows casts windows to int32; cast yourself if you read them directly.
  """
  if not os.path.isdir(tokens_path):
    raise ConfigError(f"data.tokens_path={tokens_path!r} is not a directory")
  meta = read_meta(tokens_path)  # fail early, with the helpful message, on a half-written directory
  if "shards" in meta:
    return _load_shards(tokens_path, meta, "train"), _load_shards(tokens_path, meta, "val")
  return _load_npy(tokens_path, TRAIN_FILE), _load_npy(tokens_path, VAL_FILE)


# ----------------------------------------------------------------------------
# The config entry point.


def mixture_components(cfg: DataConfig) -> list[tuple[str, DataConfig, float]]:
  """`data.mixture` -> [(name 'mixI', the component's DataConfig, weight)]; [] when off.

  Each component is `cfg` with its source and location replaced, so every other data key applies to all.
  """
  if not cfg.mixture.strip():
    return []
  out = []
  for i, entry in enumerate(e.strip() for e in cfg.mixture.split(";")):
    where = f"data.mixture entry {i} ({entry!r})"
    spec, eq, weight = entry.rpartition("=")
    source, colon, location = spec.partition(":")
    if not (eq and colon):
      raise ConfigError(f"{where} is not SOURCE:LOCATION=WEIGHT")
    if source not in ("stdlib", "text", *documents_lib.FORMATS, "tokens"):
      raise ConfigError(f"{where}: source {source!r} is not one of "
                        f"{['stdlib', 'text', *documents_lib.FORMATS, 'tokens']}")
    try:
      w = float(weight)
    except ValueError:
      w = float("nan")
    if not w > 0 or w == float("inf"):
      raise ConfigError(f"{where}: weight {weight!r} is not a positive number")
    if source != "stdlib" and not location:
      raise ConfigError(f"{where}: source {source!r} needs a location (its glob or tokens directory)")
    part = dataclasses.replace(cfg, mixture="", source=source, glob=location if source != "tokens" else "",
                               tokens_path=location if source == "tokens" else "")
    out.append((f"mix{i}", part, w))
  return out


def load_splits(cfg: DataConfig):
  """-> (tokenizer, train_tokens [N_train], val_tokens [N_val]) for `cfg` (cached underneath).

  Raises ConfigError naming data.seq_len when a split is shorter than one
  window of seq_len + 1 tokens.
  """
  if mixture_components(cfg):
    # The tokenizer is shared by every component (checked for each); the splits are the components'.
    for _, part, _ in mixture_components(cfg):
      load_splits(part)
    return get_tokenizer(cfg.tokenizer), None, None
  if cfg.source == "synthetic":
    # Examples are generated per index (recursive_lm/data/synthetic.py): no token arrays.
    return get_tokenizer(cfg.tokenizer), None, None
  if cfg.source == "stdlib":
    train, val = stdlib_splits(cfg.tokenizer, cfg.max_bytes, cfg.val_fraction)
  elif cfg.source == "text":
    if not cfg.glob:
      raise ConfigError("data.source='text' needs data.glob")
    train, val = text_splits(cfg.glob, cfg.tokenizer, cfg.max_bytes, cfg.val_fraction)
  elif cfg.source in documents_lib.FORMATS:
    if not cfg.glob:
      raise ConfigError(f"data.source={cfg.source!r} needs data.glob")
    train, val = document_splits(cfg.source, cfg.glob, cfg.tokenizer, cfg.max_bytes, cfg.val_fraction,
                                 cfg.text_field, cfg.decode_errors)
  elif cfg.source == "tokens":
    if not cfg.tokens_path:
      raise ConfigError("data.source='tokens' needs data.tokens_path")
    train, val = tokens_splits(cfg.tokens_path)
    # The ids only mean something under the tokenizer that wrote them.
    meta = read_meta(cfg.tokens_path)
    prepared = meta.get("tokenizer")
    if prepared != cfg.tokenizer:
      raise ConfigError(f"data.tokenizer={cfg.tokenizer!r} but data.tokens_path={cfg.tokens_path!r} was "
                        f"prepared with {prepared!r}; set data.tokenizer={prepared!r}")
    # Directories written before documents were framed have no frame: (None, None).
    framed = (meta.get("document_bos"), meta.get("document_eos"))
    if framed != document_frame(get_tokenizer(cfg.tokenizer)):
      raise ConfigError(f"data.tokens_path={cfg.tokens_path!r} frames documents with (BOS, EOS) ids {framed} but "
                        f"data.tokenizer={cfg.tokenizer!r} asks for {document_frame(get_tokenizer(cfg.tokenizer))}; "
                        "prepare it again")
  else:
    raise ConfigError(f"data.source={cfg.source!r} is not one of "
                      f"{['stdlib', 'text', *documents_lib.FORMATS, 'tokens', 'synthetic']}")
  for name, arr in (("train", train), ("val", val)):
    if len(arr) < cfg.seq_len + 1:
      raise ConfigError(f"data.seq_len={cfg.seq_len} needs at least {cfg.seq_len + 1} tokens per split, "
                        f"but the {name} split has {len(arr)} (data.source={cfg.source!r}, "
                        f"data.max_bytes={cfg.max_bytes}, data.val_fraction={cfg.val_fraction})")
  return get_tokenizer(cfg.tokenizer), train, val
