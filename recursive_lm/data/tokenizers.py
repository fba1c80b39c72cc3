"""Tokenizers behind one small interface, chosen by the `data.tokenizer` spec.

Every tokenizer exposes:
  vocab_size: int
  is_byte_level: bool   True when one token is one byte of UTF-8, so a loss in
                        nats/token converts to bits-per-byte by / ln 2 alone.
  encode(text: str) -> np.ndarray int32 [N]
  decode(ids: array-like int [N]) -> str

Optional back ends (sentencepiece, tokenizers) are imported only when asked
for, so the default byte path needs nothing beyond numpy.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from recursive_lm.config import ConfigError


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocab 256, no special tokens, lossless."""

  vocab_size = 256
  is_byte_level = True
  spec = "byte"

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

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [N]; no BOS/EOS (documents are joined by the corpus code)."""
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])


class HFTokenizer:
  """A Hugging Face `tokenizer.json` file (`pip install tokenizers`)."""

  is_byte_level = False

  def __init__(self, path: str):
    self.spec = f"hf:{path}"
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError(f"data.tokenizer={self.spec!r} needs the tokenizers package "
                        "(pip install tokenizers)") from None
    _require_file(self.spec, path)
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [N]; special tokens off so no BOS lands mid-stream."""
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


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
    from recursive_lm.convert.tokenizer import GGUFTokenizer  # pylint: disable=g-import-not-at-top
    return GGUFTokenizer(path)
  raise ConfigError(f"data.tokenizer={spec!r} is not 'byte', 'sentencepiece:PATH', 'hf:PATH' or 'gguf:PATH'")
