"""Tokenize a corpus once into a directory that `data.source='tokens'` reads.

  python -m recursive_lm.data.prepare --source text --glob 'corpus/**/*.txt' \\
      --tokenizer byte --out /tmp/tok [--val_fraction 0.05 --max_bytes 0]

Writes OUT/train.npy and OUT/val.npy (uint16 when the vocabulary fits, else
int32; plain .npy so the loader can memory-map them without pickle) and
OUT/meta.json, then prints a one-line JSON summary. The split is the one
documented in recursive_lm.data.sources, so training from the prepared
directory sees the same tokens as training from the raw source.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from recursive_lm.config import ConfigError
from recursive_lm.data import sources
from recursive_lm.data.tokenizers import document_frame, get_tokenizer


def write_tokens(out: str, train: np.ndarray, val: np.ndarray, meta: dict) -> dict:
  """Save the two splits and meta.json into `out`; returns the full meta written."""
  vocab_size = int(meta["vocab_size"])
  dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32
  os.makedirs(out, exist_ok=True)
  meta = {**meta, "dtype": np.dtype(dtype).name, "train_tokens": int(len(train)), "val_tokens": int(len(val))}
  for name, arr in ((sources.TRAIN_FILE, train), (sources.VAL_FILE, val)):
    np.save(os.path.join(out, name), np.asarray(arr).astype(dtype), allow_pickle=False)
  # meta.json last: its presence marks a complete directory for the loader.
  with open(os.path.join(out, sources.META_FILE), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  return meta


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m recursive_lm.data.prepare", description=__doc__.split("\n")[0])
  p.add_argument("--source", choices=("stdlib", "text"), default="stdlib")
  p.add_argument("--glob", default="", help="text: glob of UTF-8 files (** recursive)")
  p.add_argument("--tokenizer", default="byte", help="byte | sentencepiece:PATH | hf:PATH | gguf:PATH")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--val_fraction", type=float, default=0.05)
  p.add_argument("--max_bytes", type=int, default=0, help="cap on corpus bytes read (0: all)")
  args = p.parse_args(argv)

  start = time.perf_counter()
  try:
    if not 0.0 < args.val_fraction < 1.0:
      raise ConfigError(f"--val_fraction={args.val_fraction} must be in (0, 1)")
    if args.max_bytes < 0:
      raise ConfigError(f"--max_bytes={args.max_bytes} must be >= 0")
    tok = get_tokenizer(args.tokenizer)
    if args.source == "stdlib":
      train, val = sources.stdlib_splits(args.tokenizer, args.max_bytes, args.val_fraction)
    else:
      if not args.glob:
        raise ConfigError("--source text needs --glob (data.glob)")
      train, val = sources.text_splits(args.glob, args.tokenizer, args.max_bytes, args.val_fraction)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  first, last = document_frame(tok)
  meta = write_tokens(args.out, train, val, {
      "tokenizer": args.tokenizer, "vocab_size": tok.vocab_size, "is_byte_level": tok.is_byte_level,
      "document_bos": first, "document_eos": last,
      "source": args.source, "glob": args.glob, "val_fraction": args.val_fraction, "max_bytes": args.max_bytes})
  print(json.dumps({**meta, "out": args.out, "seconds": round(time.perf_counter() - start, 3)}, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
