"""Corpora, tokenizers and batch pipelines (see sources.py for the split rule).

  tok, train, val = load_splits(cfg.data)            # 1-D token arrays, cached
  it = train_iterator(cfg.data, seed, jax.process_index(), jax.process_count())
  batches = eval_batches(cfg.data, n, jax.process_index(), jax.process_count())

`prepare` (the CLI) is deliberately not imported here, so that
`python -m recursive_lm.data.prepare` runs without a double-import warning.
"""

from recursive_lm.data.pipeline import TokenWindows, eval_batches, eval_sets, train_dataset, train_iterator
from recursive_lm.data.sources import load_splits, read_meta, stdlib_splits, text_splits, tokens_splits
from recursive_lm.data.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, get_tokenizer

__all__ = [
    "ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer", "TokenWindows", "eval_batches", "eval_sets",
    "get_tokenizer",
    "load_splits", "read_meta", "stdlib_splits", "text_splits", "tokens_splits", "train_dataset",
    "train_iterator",
]
