"""Tokenizers behind one small interface, chosen by the `data.tokenizer` spec.

Every tokenizer exposes:
  vocab_size: int
  is_byte_level: bool   True when one token is one byte of UTF-8, so a loss in
                        nats/token converts to bits-per-byte by / ln 2 alone.
  bos_id, eos_id: int | None   the beginning / end of sequence tokens, if any
  add_bos: bool         the model expects BOS at the start of every sequence
                        (what the model's own tokenizer adds with special tokens
                        on); `encode_prompt` and the data pipeline follow it
  encode(text: str) -> np.ndarray int32 [N]   never adds special tokens
  decode(ids: array-like int [N]) -> str

A `tokenizer.json` carries its BOS rule in its post-processor; BOS/EOS ids and
`add_bos_token` can also come from a `tokenizer_config.json` beside it (the
Hugging Face layout), which is how a converted run directory keeps them
(`HFTokenizer.save`).

Optional back ends (sentencepiece, tokenizers) are imported only when asked
for, so the default byte path needs nothing beyond numpy.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from recursive_lm.config import ConfigError


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocab 256, no special tokens, lossless."""

  vocab_size = 256
  is_byte_level = True
  spec = "byte"
  bos_id = eos_id = None
  add_bos = False

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [num_bytes]."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """int [N] -> str; ids that do not form valid UTF-8 become U+FFFD."""
    # Model samples can end mid-character or be any byte sequence; replace
    # rather than raise so printing a sample never fails.
    return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


def _require_file(spec: str, path: str) -> None:
  if not os.path.isfile(path):
    raise ConfigError(f"data.tokenizer={spec!r}: model file {path!r} does not exist")


class SentencePieceTokenizer:
  """A trained SentencePiece model file (`pip install sentencepiece`)."""

  is_byte_level = False

  def __init__(self, path: str):
    self.spec = f"sentencepiece:{path}"
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError(f"data.tokenizer={self.spec!r} needs the sentencepiece package "
                        "(pip install sentencepiece)") from None
    _require_file(self.spec, path)
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())
    # A .model file names its BOS/EOS pieces but not whether the model wants
    # BOS, so nothing is added (as before); the ids are there for generation.
    self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
    self.eos_id = int(self._sp.eos_id()) if self._sp.eos_id() >= 0 else None
    self.add_bos = False

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [N]; no BOS/EOS (documents are joined by the corpus code)."""
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])


CONFIG_FILE = "tokenizer_config.json"  # beside tokenizer.json: bos_token, eos_token, add_bos_token


def _import_tokenizers(spec: str):
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(f"data.tokenizer={spec!r} needs the tokenizers package (pip install tokenizers)") from None
  return tokenizers


class HFTokenizer:
  """A Hugging Face `tokenizer.json` file (`pip install tokenizers`).

  BOS/EOS: the post-processor decides what the file's own encode adds with
  special tokens on (a single leading token is BOS, a single trailing one
  EOS); a tokenizer_config.json in the same directory, when present, names
  bos_token / eos_token and may set add_bos_token, and wins.
  """

  is_byte_level = False

  def __init__(self, path: str):
    self.spec = f"hf:{path}"
    tokenizers = _import_tokenizers(self.spec)
    _require_file(self.spec, path)
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.bos_id, self.eos_id, self.add_bos = _post_processor_specials(self._tok)
    config = os.path.join(os.path.dirname(path), CONFIG_FILE)
    if os.path.isfile(config):
      self._read_config(config)

  def _read_config(self, path: str) -> None:
    try:
      with open(path) as f:
        cfg = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError(f"data.tokenizer={self.spec!r}: {path} is not readable JSON ({e})") from None
    for key in ("bos_token", "eos_token"):
      token = cfg.get(key)
      if isinstance(token, dict):  # an AddedToken written out: {"content": ..., ...}
        token = token.get("content")
      if token is None:
        continue
      i = self._tok.token_to_id(token)
      if i is None:
        raise ConfigError(f"data.tokenizer={self.spec!r}: {path} names {key}={token!r}, which the vocabulary lacks")
      setattr(self, key.replace("_token", "_id"), int(i))
    if cfg.get("add_bos_token") is not None:
      self.add_bos = bool(cfg["add_bos_token"])
    if self.add_bos and self.bos_id is None:
      raise ConfigError(f"data.tokenizer={self.spec!r}: {path} sets add_bos_token but names no bos_token")

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [N]; special tokens off (BOS is added by encode_prompt / the corpus code)."""
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

  def save(self, directory: str) -> str:
    """Write DIRECTORY/tokenizer.json and DIRECTORY/tokenizer_config.json (the
    BOS/EOS facts); returns the tokenizer.json path, which `hf:PATH` reloads
    with the same ids, BOS rule and EOS."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    self._tok.save(path)
    cfg = {"add_bos_token": self.add_bos}
    for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
      if i is not None:
        cfg[key] = self._tok.id_to_token(i)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
      json.dump(cfg, f, indent=1)
    return path


def _post_processor_specials(tok) -> tuple[int | None, int | None, bool]:
  """(bos_id, eos_id, add_bos) that a `tokenizers.Tokenizer`'s post-processor
  implies: what encode with special tokens on puts before and after the text."""
  plain = tok.encode("a", add_special_tokens=False).ids
  full = tok.encode("a", add_special_tokens=True).ids
  for k in range(len(full) - len(plain) + 1):
    if full[k:k + len(plain)] == plain:
      before, after = full[:k], full[k + len(plain):]
      return (before[0] if len(before) == 1 else None), (after[0] if len(after) == 1 else None), len(before) == 1
  return None, None, False


def encode_prompt(tok, text: str) -> np.ndarray:
  """str -> int32 [N]: the text's ids, after BOS when the tokenizer expects it
  (a pretrained model given text without BOS is off its training distribution)."""
  ids = tok.encode(text)
  if tok.add_bos:
    ids = np.concatenate([np.asarray([tok.bos_id], np.int32), ids])
  return ids


def document_frame(tok) -> tuple[int | None, int | None]:
  """(first, last): the special ids the corpus code puts around each document,
  (BOS, EOS or None) for tokenizers that expect BOS, else (None, None) and
  documents are joined by a blank line instead."""
  return (tok.bos_id, tok.eos_id) if tok.add_bos else (None, None)


@functools.lru_cache(maxsize=None)
def get_tokenizer(spec: str):
  """'byte' | 'sentencepiece:PATH' | 'hf:PATH' | 'gguf:PATH' -> tokenizer (cached per spec).

  Raises ConfigError (a ValueError) naming data.tokenizer for anything else.
  """
  if spec == "byte":
    return ByteTokenizer()
  kind, sep, path = spec.partition(":")
  if sep and path and kind == "sentencepiece":
    return SentencePieceTokenizer(path)
  if sep and path and kind == "hf":
    return HFTokenizer(path)
  if sep and path and kind == "gguf":  # the tokenizer in a GGUF file's metadata (needs gguf and tokenizers)
    from recursive_lm.data.gguf_tokenizer import GGUFTokenizer  # pylint: disable=g-import-not-at-top
    return GGUFTokenizer(path)
  raise ConfigError(f"data.tokenizer={spec!r} is not 'byte', 'sentencepiece:PATH', 'hf:PATH' or 'gguf:PATH'")
