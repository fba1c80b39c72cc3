"""Tokenizers stored in GGUF files (the `gguf:PATH` spec; converted models).

A GGUF file carries its tokenizer as metadata (`tokenizer.ggml.*`): the token
strings, their scores and types, and sometimes BPE merges. `from_gguf` builds
a `tokenizers.Tokenizer` from that metadata (SentencePiece-style BPE, the kind
Gemma and Llama 1/2 use), so the same ids come out as from the model's own
tokenizer; `GGUFTokenizer` wraps it behind the interface of
`recursive_lm.data.tokenizers` (spec `gguf:PATH`). Safetensors checkpoints ship
a `tokenizer.json`, which the existing `hf:PATH` spec reads directly.

How a SentencePiece BPE vocabulary becomes merges: the merge that produces a
token ranks by that token's priority, and a token reachable by several splits
lists the split with the longer left part first. Gemma's scores do not follow
its merge order but the file's token order does, so for Gemma files the
priority is the position in the file; other files use the scores. Tokens of
only spaces are spelled with real spaces in Gemma files and with U+2581 in the
text the model sees, so they are respelled.
"""

from __future__ import annotations


from recursive_lm.config import ConfigError
from recursive_lm.data.tokenizers import HFTokenizer

SPIECE_SPACE = "\u2581"
# llama.cpp token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def _field(reader, key, default=None):
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def gguf_metadata(path: str) -> dict:
  """The tokenizer metadata of a GGUF file: {'arch', 'model', 'tokens', 'scores', 'types', 'merges', ids...}."""
  try:
    import gguf
  except ImportError:
    raise ConfigError(f"reading the tokenizer of {path!r} needs the gguf package (pip install gguf)") from None
  reader = gguf.GGUFReader(path)
  meta = {"arch": _field(reader, "general.architecture", ""), "model": _field(reader, "tokenizer.ggml.model")}
  if meta["model"] is None:
    raise ConfigError(f"{path}: the GGUF file holds no tokenizer (no tokenizer.ggml.model)")
  meta["tokens"] = _field(reader, "tokenizer.ggml.tokens")
  meta["scores"] = _field(reader, "tokenizer.ggml.scores")
  meta["types"] = _field(reader, "tokenizer.ggml.token_type")
  meta["merges"] = _field(reader, "tokenizer.ggml.merges")
  for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_space_prefix",
              "add_bos_token"):
    meta[key] = _field(reader, f"tokenizer.ggml.{key}")
  return meta


def derive_merges(tokens: list[str], priority: list[float]) -> list[tuple[str, str]]:
  """BPE merges implied by a vocabulary: every split of a token into two
  tokens, best priority first (ties: longer left part first, then the order
  of the tokens and of the pieces' ids)."""
  ids = {}
  for i, t in enumerate(tokens):
    ids[t] = i  # a repeated spelling keeps its last id, as a dict built in order would
  candidates = []
  seen = set()
  for t, p in zip(tokens, priority):
    if t in seen:
      continue
    seen.add(t)
    local = [(t[:i], t[i:]) for i in range(1, len(t)) if t[:i] in ids and t[i:] in ids]
    local.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
    candidates.extend((l, r, p) for l, r in local)
  # Stable sort, best first: priority, then the longer left piece, then the longer right piece.
  candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
  return [(l, r) for l, r, _ in candidates]


def from_gguf(path: str):
  """A `tokenizers.Tokenizer` equivalent to the GGUF file's tokenizer."""
  return from_metadata(gguf_metadata(path), path)


def from_metadata(meta: dict, what: str = "GGUF"):
  try:
    import tokenizers
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers.models import BPE
  except ImportError:
    raise ConfigError(f"building the tokenizer of {what} needs the tokenizers package (pip install tokenizers)") from None
  if meta["model"] != "llama":
    raise ConfigError(f"{what}: tokenizer.ggml.model={meta['model']!r} is not supported (only SentencePiece BPE, "
                      "'llama', as in Gemma and Llama 1/2 files); convert from safetensors with tokenizer.json instead")
  gemma = meta["arch"] in GEMMA_ARCHS
  tokens = list(meta["tokens"])
  if gemma:
    tokens = [SPIECE_SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    priority = [-float(i) for i in range(len(tokens))]
  else:
    priority = [float(s) for s in meta["scores"]]
  if meta.get("merges"):
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
  else:
    merges = derive_merges(tokens, priority)
  vocab = {t: i for i, t in enumerate(tokens)}
  unk_id = meta.get("unknown_token_id")
  unk = tokens[unk_id] if unk_id is not None else None
  tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
  add_prefix = meta.get("add_space_prefix")
  if add_prefix is None:
    add_prefix = not gemma  # llama.cpp's default for SentencePiece vocabularies
  steps = [normalizers.Prepend(SPIECE_SPACE)] if add_prefix else []
  tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPIECE_SPACE)])
  tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
  types = list(meta["types"]) if meta.get("types") is not None else [NORMAL] * len(tokens)
  control = [AddedToken(t, special=True, normalized=False) for t, k in zip(meta["tokens"], types) if k == CONTROL]
  if control:
    tok.add_special_tokens(control)
  user = [AddedToken(t, special=False, normalized=False) for t, k in zip(meta["tokens"], types)
          if k == USER_DEFINED and t in vocab]
  if user:
    tok.add_tokens(user)
  bos_id, _, add_bos = specials(meta, len(tokens), what)
  if add_bos:  # encode with special tokens on adds BOS, as the model's own tokenizer.json does
    bos = meta["tokens"][bos_id]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, bos_id)])
  return tok


class GGUFTokenizer(HFTokenizer):
  """The tokenizer stored in a GGUF file (spec `gguf:PATH`; needs gguf and tokenizers).

  BOS/EOS from tokenizer.ggml.bos_token_id / eos_token_id; add_bos from
  tokenizer.ggml.add_bos_token (absent: True when there is a BOS, llama.cpp's
  rule for SentencePiece vocabularies). `save` writes it as tokenizer.json +
  tokenizer_config.json, which `hf:PATH` reads back the same.
  """

  def __init__(self, path: str):  # pylint: disable=super-init-not-called
    import os
    self.spec = f"gguf:{path}"
    if not os.path.isfile(path):
      raise ConfigError(f"data.tokenizer={self.spec!r}: file {path!r} does not exist")
    meta = gguf_metadata(path)
    self._tok = from_metadata(meta, path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.bos_id, self.eos_id, self.add_bos = specials(meta, self.vocab_size, path)


def specials(meta: dict, vocab_size: int, what: str) -> tuple[int | None, int | None, bool]:
  """(bos_id, eos_id, add_bos) from GGUF tokenizer metadata."""
  ids = []
  for key in ("bos_token_id", "eos_token_id"):
    i = meta.get(key)
    if i is not None and not 0 <= int(i) < vocab_size:
      raise ConfigError(f"{what}: tokenizer.ggml.{key}={i} is outside the vocabulary of {vocab_size}")
    ids.append(None if i is None else int(i))
  add_bos = meta.get("add_bos_token")
  add_bos = ids[0] is not None if add_bos is None else bool(add_bos)
  if add_bos and ids[0] is None:
    raise ConfigError(f"{what}: tokenizer.ggml.add_bos_token is set but there is no tokenizer.ggml.bos_token_id")
  return ids[0], ids[1], add_bos
