"""Tokenize a corpus once into a directory that `data.source='tokens'` reads.

  python -m recursive_lm.data.prepare --source jsonl --glob 'corpus/*.jsonl.zst' \\
      --tokenizer byte --out /tmp/tok [--workers 2 --val_fraction 0.05 --text_field text]

Sources: stdlib, text (a file is a document), jsonl, parquet, arrayrecord (see
recursive_lm.data.documents). The split is the one documented in
recursive_lm.data.sources, so training from the prepared directory sees the same
tokens as training from the raw source.

Streaming (the default): the sorted files are cut into units of about
--shard_bytes of input; worker processes tokenize one unit each, a document at a
time, appending its tokens to OUT/{train,val}/NNNNN.bin.tmp (raw uint16, or
int32 for vocabularies over 65535) and renaming each to .bin when the unit is
complete. Memory is bounded by a few documents per worker, not the corpus.
OUT/progress.json records every finished unit, so a killed prepare, run again
with the same arguments, redoes only the unfinished units and ends with the
same bytes as an uninterrupted run. meta.json, written last, lists the shards
and marks the directory complete. Each shard holds, per document on its side,
the separator and the document's tokens (or BOS + tokens + EOS for tokenizers
that expect BOS); the reader drops the side's first separator, so the
concatenated shards equal the in-memory split exactly.

--max_bytes > 0 and corpora too small for the hash rule to fill both sides
(rule 4) are prepared in memory, into OUT/train.npy and OUT/val.npy.

One prepare per OUT (an flock on OUT/.lock.process_0); a directory prepared with
other arguments (another tokenizer, say) is refused rather than mixed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np

from recursive_lm.config import ConfigError
from recursive_lm.data import documents as documents_lib
from recursive_lm.data import sources
from recursive_lm.data.tokenizers import document_frame, get_tokenizer

PROGRESS_FILE = "progress.json"
SIDES = ("train", "val")
_FLUSH_TOKENS = 1 << 20  # tokens buffered per side before an append to the shard


def write_tokens(out: str, train: np.ndarray, val: np.ndarray, meta: dict) -> dict:
  """Save the two splits and meta.json into `out`; returns the full meta written."""
  vocab_size = int(meta["vocab_size"])
  dtype = token_dtype(vocab_size)
  os.makedirs(out, exist_ok=True)
  meta = {**meta, "dtype": np.dtype(dtype).name, "train_tokens": int(len(train)), "val_tokens": int(len(val))}
  for name, arr in ((sources.TRAIN_FILE, train), (sources.VAL_FILE, val)):
    np.save(os.path.join(out, name), np.asarray(arr).astype(dtype), allow_pickle=False)
  # meta.json last: its presence marks a complete directory for the loader.
  _write_json(os.path.join(out, sources.META_FILE), meta)
  return meta


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32


def _write_json(path: str, obj) -> None:
  """Atomically: a reader sees the old file or the new one, never half of one."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def corpus_files(source: str, pattern: str) -> sources.Files:
  if source == "stdlib":
    return sources.stdlib_files()
  if not pattern:
    raise ConfigError(f"--source {source} needs --glob (data.glob)")
  return sources.text_files(pattern)


def make_units(files: sources.Files, shard_bytes: int) -> list[list[tuple[str, str]]]:
  """Consecutive files grouped until each group holds >= shard_bytes of input (the last may hold less)."""
  units, cur, size = [], [], 0
  for rel, path in files:
    cur.append((rel, path))
    size += os.path.getsize(path)
    if size >= shard_bytes:
      units.append(cur)
      cur, size = [], 0
  if cur:
    units.append(cur)
  return units


def _unit_documents(source, unit, field, errors, count):
  """(identity, UTF-8 bytes) of every document of a unit's files, in order."""
  if source in ("stdlib", "text"):
    for rel, path in unit:  # a file is one document, its relpath its identity (sources' rule 1)
      with open(path, "rb") as f:
        yield rel, f.read()
  else:
    yield from documents_lib.documents(source, unit, field, errors, count)


def shard_path(out: str, side: str, index: int) -> str:
  return os.path.join(out, side, f"{index:05d}.bin")


def prepare_unit(job: dict) -> dict:
  """Tokenize unit `job['index']` into its train and val shards; returns its counts.

  Runs in a worker process: everything it needs is in `job` (plain data).
  """
  tok = get_tokenizer(job["tokenizer"])
  first, last = document_frame(tok)
  dtype = token_dtype(tok.vocab_size)
  head = np.asarray([first] if first is not None else [], np.int64)
  tail = np.asarray([last] if last is not None else [], np.int64)
  # Without a frame documents are joined by the separator: each one carries it in front (see module doc).
  sep = (np.zeros(0, np.int64) if first is not None else
         np.frombuffer(sources.SEPARATOR, np.uint8).astype(np.int64) if tok.is_byte_level else
         tok.encode(sources.SEPARATOR.decode()).astype(np.int64))
  out, index = job["out"], job["index"]
  files = {side: open(shard_path(out, side, index) + ".tmp", "wb") for side in SIDES}
  buffers = {side: [] for side in SIDES}
  counts = {"documents": 0, "train_tokens": 0, "val_tokens": 0}
  decode = documents_lib.DecodeCount()

  def flush(side):
    if buffers[side]:
      np.concatenate(buffers[side]).astype(dtype).tofile(files[side])
      buffers[side].clear()

  pending = {side: 0 for side in SIDES}
  for key, text in _unit_documents(job["source"], job["files"], job["text_field"], job["decode_errors"], decode):
    if not text:
      continue  # as in memory: an empty document adds nothing, not even a separator
    side = "val" if sources.is_val_file(key, job["val_fraction"]) else "train"
    ids = (np.frombuffer(text, np.uint8).astype(np.int64) if tok.is_byte_level
           else tok.encode(text.decode("utf-8", errors="replace")).astype(np.int64))
    piece = np.concatenate([sep, head, ids, tail])
    buffers[side].append(piece)
    pending[side] += len(piece)
    counts[f"{side}_tokens"] += len(piece)
    counts["documents"] += 1
    if pending[side] >= _FLUSH_TOKENS:
      flush(side)
      pending[side] = 0
  for side in SIDES:
    flush(side)
    files[side].close()
    os.replace(shard_path(out, side, index) + ".tmp", shard_path(out, side, index))
  return {"index": index, **counts, "replaced": decode.replaced}


class Progress:
  """One stderr line at most every `every` seconds: units, documents, tokens/s, ETA."""

  def __init__(self, total_units: int, total_bytes: int, every: float = 1.0):
    self.total_units, self.total_bytes, self.every = total_units, total_bytes, every
    self.start, self.last = time.time(), 0.0
    self.units = self.docs = self.tokens = self.bytes = 0

  def update(self, stats: dict, unit_bytes: int, final: bool = False) -> None:
    self.units += 1
    self.docs += stats["documents"]
    self.tokens += stats["train_tokens"] + stats["val_tokens"]
    self.bytes += unit_bytes
    now = time.time()
    if final or now - self.last >= self.every:
      self.last = now
      elapsed = max(now - self.start, 1e-9)
      eta = elapsed / max(self.bytes, 1) * (self.total_bytes - self.bytes)
      print(f"prepare: {self.units}/{self.total_units} units  {self.docs:,} documents  {self.tokens:,} tokens  "
            f"{self.tokens / elapsed:,.0f} tok/s  eta {int(eta // 60)}m{int(eta % 60):02d}s", file=sys.stderr,
            flush=True)


def _check_previous(out: str, settings: dict) -> dict:
  """The finished units recorded in OUT by an earlier prepare with the same settings; ConfigError for others."""
  for name in (PROGRESS_FILE, sources.META_FILE):
    path = os.path.join(out, name)
    if not os.path.isfile(path):
      continue
    try:
      with open(path) as f:
        previous = json.load(f)
    except ValueError:
      raise ConfigError(f"{path} is not JSON; remove {out} or choose another --out") from None
    before = previous.get("settings", {k: previous[k] for k in settings if k in previous})
    if before.get("tokenizer") != settings["tokenizer"]:
      raise ConfigError(f"--out={out} was prepared with tokenizer {before.get('tokenizer')!r}, not "
                        f"{settings['tokenizer']!r}; choose another --out or remove it")
    changed = sorted(k for k in settings if k in before and before[k] != settings[k])
    if changed:
      raise ConfigError(f"--out={out} was prepared with other settings ({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); "
                        "choose another --out or remove it")
    if name == PROGRESS_FILE:
      return {int(k): v for k, v in previous["done"].items()}
  return {}


def prepare_streaming(settings: dict, out: str, workers: int, shard_bytes: int, crash_after: int = 0) -> dict:
  """Tokenize `settings` (source, glob, tokenizer, ...) into shards under `out`; returns meta.json's content.

  Returns None when the corpus needs rule 4 (one side has no document): the caller prepares it in memory.
  """
  files = corpus_files(settings["source"], settings["glob"])
  units = make_units(files, shard_bytes)
  settings = {**settings, "units": len(units), "files_digest": _digest(files)}
  done = _check_previous(out, settings)
  if os.path.isfile(os.path.join(out, sources.META_FILE)):
    with open(os.path.join(out, sources.META_FILE)) as f:
      return json.load(f)  # already complete with these settings: nothing to do
  for side in SIDES:
    os.makedirs(os.path.join(out, side), exist_ok=True)
    for name in os.listdir(os.path.join(out, side)):  # partial shards of a killed prepare
      if name.endswith(".tmp") or int(name.split(".")[0]) not in done:
        os.remove(os.path.join(out, side, name))
  sizes = [sum(os.path.getsize(p) for _, p in u) for u in units]
  progress = Progress(len(units), sum(sizes) - sum(sizes[i] for i in done))
  jobs = [{**settings, "out": out, "index": i, "files": u} for i, u in enumerate(units) if i not in done]

  def record(stats):
    done[stats["index"]] = stats
    _write_json(os.path.join(out, PROGRESS_FILE), {"settings": settings, "done": done})
    progress.update(stats, sizes[stats["index"]], final=len(done) == len(units))
    if crash_after and len(done) >= crash_after:  # tests: a prepare killed mid-way
      os._exit(9)

  if workers <= 1 or len(jobs) <= 1:
    for job in jobs:
      record(prepare_unit(job))
  else:
    # spawn: workers start clean (no forked threads or locks of the parent).
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
      for stats in pool.imap_unordered(prepare_unit, jobs):
        record(stats)

  tok = get_tokenizer(settings["tokenizer"])
  totals = {k: sum(done[i][k] for i in done) for k in ("documents", "train_tokens", "val_tokens", "replaced")}
  if not totals["train_tokens"] or not totals["val_tokens"]:
    shutil.rmtree(os.path.join(out, "train")), shutil.rmtree(os.path.join(out, "val"))
    os.remove(os.path.join(out, PROGRESS_FILE))
    return None
  first, _ = document_frame(tok)
  sep = 0 if first is not None else (len(sources.SEPARATOR) if tok.is_byte_level
                                     else len(tok.encode(sources.SEPARATOR.decode())))
  meta = {**{k: settings[k] for k in settings}, "settings": settings, "vocab_size": tok.vocab_size,
          "is_byte_level": tok.is_byte_level, "document_bos": document_frame(tok)[0],
          "document_eos": document_frame(tok)[1], "dtype": np.dtype(token_dtype(tok.vocab_size)).name,
          "skip_first": sep, "documents": totals["documents"], "replaced": totals["replaced"],
          "train_tokens": totals["train_tokens"] - sep, "val_tokens": totals["val_tokens"] - sep,
          "shards": {side: [[os.path.join(side, os.path.basename(shard_path(out, side, i))),
                             done[i][f"{side}_tokens"]] for i in sorted(done)] for side in SIDES}}
  _write_json(os.path.join(out, sources.META_FILE), meta)  # last: the directory is complete
  return meta


TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(settings: dict, vocab_size: int, out: str) -> str:
  """Train a byte-level BPE of `vocab_size` tokens on the training side of the corpus; save
  OUT/tokenizer.json and return its spec ('hf:OUT/tokenizer.json').

  Byte-level: every byte is in the alphabet, so any text encodes and decodes
  back exactly. The documents are streamed (the trainer keeps word counts, not
  the text). A tokenizer.json already in OUT (a resumed prepare) is kept.
  """
  path = os.path.join(os.path.abspath(out), TOKENIZER_FILE)
  if os.path.isfile(path):
    return f"hf:{path}"
  if vocab_size < 257:
    raise ConfigError(f"--train_tokenizer={vocab_size} must be > 256 (the byte alphabet)")
  from recursive_lm.data.tokenizers import _import_tokenizers  # pylint: disable=g-import-not-at-top
  tk = _import_tokenizers(f"--train_tokenizer={vocab_size}")
  files = corpus_files(settings["source"], settings["glob"])
  count = documents_lib.DecodeCount()

  def texts():
    for key, text in _unit_documents(settings["source"], files, settings["text_field"], settings["decode_errors"],
                                     count):
      if not sources.is_val_file(key, settings["val_fraction"]):  # never learn from validation text
        yield text.decode("utf-8", errors="replace")

  tok = tk.Tokenizer(tk.models.BPE())
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                   show_progress=False)
  tok.train_from_iterator(texts(), trainer=trainer)
  os.makedirs(out, exist_ok=True)
  tok.save(path + ".tmp")
  os.replace(path + ".tmp", path)
  return f"hf:{path}"


def _digest(files: sources.Files) -> str:
  """Which files (names and sizes) a prepare covers: a resume over a changed corpus is refused."""
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for rel, path in files:
    h.update(f"{rel}\0{os.path.getsize(path)}\n".encode())
  return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m recursive_lm.data.prepare", description=__doc__.split("\n")[0])
  p.add_argument("--source", choices=("stdlib", "text", *documents_lib.FORMATS), default="stdlib")
  p.add_argument("--glob", default="", help="glob of the corpus files (** recursive)")
  p.add_argument("--tokenizer", default="byte", help="byte | sentencepiece:PATH | hf:PATH | gguf:PATH")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--val_fraction", type=float, default=0.05)
  p.add_argument("--max_bytes", type=int, default=0, help="cap on corpus bytes read (0: all; > 0: in memory)")
  p.add_argument("--text_field", default="text", help="jsonl field / parquet column of the text")
  p.add_argument("--decode_errors", choices=documents_lib.DECODE_ERRORS, default="replace")
  p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
  p.add_argument("--train_tokenizer", type=int, default=0,
                 help="N > 256: train a byte-level BPE of N tokens on the training side, save OUT/tokenizer.json "
                 "and tokenize with it (then data.tokenizer=hf:OUT/tokenizer.json)")
  p.add_argument("--shard_bytes", type=int, default=256 << 20, help="input bytes per unit of work (one shard)")
  args = p.parse_args(argv)

  from recursive_lm import workdir_lock  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  lock = None
  try:
    if not 0.0 < args.val_fraction < 1.0:
      raise ConfigError(f"--val_fraction={args.val_fraction} must be in (0, 1)")
    if args.max_bytes < 0:
      raise ConfigError(f"--max_bytes={args.max_bytes} must be >= 0")
    if args.shard_bytes <= 0 or args.workers <= 0:
      raise ConfigError("--shard_bytes and --workers must be > 0")
    if args.train_tokenizer and args.tokenizer != "byte":
      raise ConfigError("--train_tokenizer trains the tokenizer; leave --tokenizer at 'byte'")
    lock = workdir_lock.WorkdirLock(args.out)  # a second prepare on this OUT is refused here
    settings = {"source": args.source, "glob": args.glob, "tokenizer": args.tokenizer,
                "val_fraction": args.val_fraction, "max_bytes": args.max_bytes, "text_field": args.text_field,
                "decode_errors": args.decode_errors}
    if args.train_tokenizer:
      if os.path.isfile(os.path.join(args.out, PROGRESS_FILE)) or os.path.isfile(os.path.join(args.out, sources.META_FILE)):
        _check_previous(args.out, {**settings, "tokenizer": f"hf:{os.path.abspath(os.path.join(args.out, TOKENIZER_FILE))}"})
      settings["tokenizer"] = args.tokenizer = train_tokenizer(settings, args.train_tokenizer, args.out)
      settings["train_tokenizer"] = args.train_tokenizer
    tok = get_tokenizer(args.tokenizer)
    meta = None
    if not args.max_bytes:
      crash = int(os.environ.get("RLM_PREPARE_CRASH_AFTER_UNITS", "0"))
      meta = prepare_streaming(settings, args.out, args.workers, args.shard_bytes, crash)
    if meta is None:  # in memory: a byte cap, or rule 4's tail split
      _check_previous(args.out, settings)
      if args.source in documents_lib.FORMATS:
        train, val = sources.document_splits(args.source, args.glob, args.tokenizer, args.max_bytes,
                                             args.val_fraction, args.text_field, args.decode_errors)
      elif args.source == "stdlib":
        train, val = sources.stdlib_splits(args.tokenizer, args.max_bytes, args.val_fraction)
      else:
        corpus_files("text", args.glob)  # the error for a missing --glob
        train, val = sources.text_splits(args.glob, args.tokenizer, args.max_bytes, args.val_fraction)
      first, last = document_frame(tok)
      meta = write_tokens(args.out, train, val, {
          **settings, "settings": settings, "vocab_size": tok.vocab_size, "is_byte_level": tok.is_byte_level,
          "document_bos": first, "document_eos": last})
    if not meta["train_tokens"] or not meta["val_tokens"]:
      raise ConfigError(f"{args.glob or args.source}: the corpus is empty")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  finally:
    if lock is not None:
      lock.release()
  summary = {k: v for k, v in meta.items() if k not in ("shards", "settings")}
  print(json.dumps({**summary, "out": args.out, "seconds": round(time.perf_counter() - start, 3)}, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
