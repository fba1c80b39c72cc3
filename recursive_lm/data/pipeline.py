"""Batches for training (a checkpointable grain iterator) and evaluation (a fixed list).

Batch format, both paths: {'inputs': int32 [B_local, T], 'targets': int32 [B_local, T]}
with T = data.seq_len, B_local = data.batch_size // process_count, and
targets[:, t] == inputs[:, t + 1] within a window (next-token prediction).
For tokenizers that expect BOS (`add_bos`), inputs[:, 0] is BOS in every row.

Multi-host contract: process p's batch k is rows p*B_local:(p+1)*B_local of the
global batch k that a single process (process_count=1) would produce, so
`jax.make_array_from_process_local_data` assembles exactly the single-host batch
and a run's data does not depend on how many hosts it used.

Keep this module free of import-time side effects: grain's multiprocess
workers re-import it.
"""

from __future__ import annotations

import mmap

import grain
import numpy as np

from recursive_lm.config import ConfigError, DataConfig
from recursive_lm.data.sources import load_splits, mixture_components

__all__ = ["TokenWindows", "train_dataset", "train_iterator", "eval_batches", "eval_sets", "load_splits"]


class TokenWindows:
  """Random-access source of non-overlapping windows over a 1-D token array.

  Window i is tokens[i*(T+1) : (i+1)*(T+1)], returned as a fresh int32 [T+1]
  (cast from uint16 memmaps on the fly); a tail shorter than T+1 is unused.
  With `bos` (an id), every window starts with it instead, for models that
  expect BOS at the start of each sequence: window i is
  [bos] + tokens[i*T : (i+1)*T], so every stream token is a target once (a
  window that starts at a document's own BOS begins with two).
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, bos: int | None = None):
    if tokens.ndim != 1:
      raise ValueError(f"TokenWindows needs a 1-D token array, got shape {tokens.shape}")
    self._tokens = tokens
    self.seq_len = seq_len
    self.bos = bos
    self._width = seq_len + (1 if bos is None else 0)  # stream tokens per window
    self._len = len(tokens) // self._width

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if index < 0:
      index += self._len
    if not 0 <= index < self._len:
      raise IndexError(f"window {index} out of range [0, {self._len})")
    start = index * self._width
    if self.bos is None:
      return np.array(self._tokens[start:start + self._width], dtype=np.int32)
    out = np.empty(self.seq_len + 1, np.int32)
    out[0] = self.bos
    out[1:] = self._tokens[start:start + self._width]
    return out

  def __getstate__(self):
    # Pickling an np.memmap copies its whole contents; ship the file location
    # instead so multiprocess workers reopen the map cheaply.
    t = self._tokens
    if isinstance(t, np.memmap) and isinstance(t.base, mmap.mmap) and t.filename:
      ref = (t.filename, t.dtype.str, t.offset, t.shape)
      return {**self.__dict__, "_tokens": None, "_memmap_ref": ref}
    return dict(self.__dict__)

  def __setstate__(self, state):
    ref = state.pop("_memmap_ref", None)
    self.__dict__.update(state)
    if ref is not None:
      filename, dtype, offset, shape = ref
      self._tokens = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)

  def __repr__(self) -> str:
    bos = "" if self.bos is None else f", bos={self.bos}"
    return f"TokenWindows(n={self._len}, seq_len={self.seq_len}{bos}, dtype={self._tokens.dtype})"


def window_bos(tok) -> int | None:
  """The id every window starts with: BOS for tokenizers that expect it (each
  row is a sequence of its own to the model), else None (plain windows)."""
  return tok.bos_id if tok.add_bos else None


def _local_batch_size(cfg: DataConfig, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if cfg.batch_size % process_count:
    raise ConfigError(f"data.batch_size={cfg.batch_size} is not divisible by the process count {process_count}")
  return cfg.batch_size // process_count


def _to_inputs_targets(windows: np.ndarray) -> dict[str, np.ndarray]:
  """int32 [B, T+1] -> {'inputs': int32 [B, T], 'targets': int32 [B, T]} (contiguous)."""
  return {"inputs": np.ascontiguousarray(windows[:, :-1]), "targets": np.ascontiguousarray(windows[:, 1:])}


def train_dataset(cfg: DataConfig, seed: int, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """The infinite, shuffled training MapDataset of this process's batches (see train_iterator)."""
  b_local = _local_batch_size(cfg, process_index, process_count)
  if cfg.source == "synthetic":
    from recursive_lm.data import synthetic
    return (grain.MapDataset.source(synthetic.source_for(cfg, "train"))
            .shuffle(seed=seed)
            .repeat(None)
            .batch(b_local, drop_remainder=True)
            [process_index::process_count])
  parts = mixture_components(cfg)
  if parts:
    # Each component shuffled and repeated on its own (its own seed), then interleaved by weight
    # (grain's mix keeps the proportions exactly), so every batch holds the mixture.
    windows = grain.MapDataset.mix([_windows(part, seed + i) for i, (_, part, _) in enumerate(parts)],
                                   [w for _, _, w in parts])
  else:
    windows = _windows(cfg, seed)
  # Batching by B_local *before* the [p::P] slice makes the P consecutive
  # chunks of one global batch go to processes 0..P-1 in order, so process p
  # holds rows p*B_local:(p+1)*B_local and reads only its own windows.
  return (windows
          .batch(b_local, drop_remainder=True)
          [process_index::process_count]
          .map(_to_inputs_targets))


def _windows(cfg: DataConfig, seed: int) -> grain.MapDataset:
  """The endless training windows of one source: int32 [T+1] each."""
  tok, train, _ = load_splits(cfg)
  # shuffle before repeat: each epoch is a full, freshly seeded permutation.
  return grain.MapDataset.source(TokenWindows(train, cfg.seq_len, window_bos(tok))).shuffle(seed=seed).repeat(None)


def train_iterator(cfg: DataConfig, seed: int, process_index: int = 0, process_count: int = 1):
  """-> grain.DatasetIterator of {'inputs', 'targets'}: int32 [B_local, T], endless.

  Supports get_state()/set_state() (a small JSON-able dict) and
  grain.checkpoint.CheckpointSave/CheckpointRestore inside an Orbax manager.
  Raises ConfigError if data.batch_size is not divisible by process_count.
  """
  ds = train_dataset(cfg, seed, process_index, process_count)
  read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
  return iter(ds.to_iter_dataset(read))


def eval_batches(cfg: DataConfig, n_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first n global validation batches, in order (no shuffle), this process's rows.

  Global batch k holds validation windows k*B .. k*B + B - 1, taken modulo the
  number of windows: a validation split smaller than n*B windows wraps around
  from its start (some windows then count more than once), so this works for
  any split of at least one window. Returns n dicts of int32 [B_local, T].
  """
  b_local = _local_batch_size(cfg, process_index, process_count)
  if cfg.source == "synthetic":  # held-out examples (split 'eval') at the training lengths
    from recursive_lm.data import synthetic
    src = synthetic.source_for(cfg, "eval")
    out = []
    for k in range(n_batches):
      first = k * cfg.batch_size + process_index * b_local
      rows = [src[first + j] for j in range(b_local)]
      out.append({key: np.stack([r[key] for r in rows]) for key in rows[0]})
    return out
  parts = mixture_components(cfg)
  if parts:  # each component's first n batches, in the order of data.mixture
    return [b for part in eval_sets(cfg, n_batches, process_index, process_count).values() for b in part]
  tok, _, val = load_splits(cfg)
  windows = TokenWindows(val, cfg.seq_len, window_bos(tok))
  out = []
  for k in range(n_batches):
    first = k * cfg.batch_size + process_index * b_local
    rows = np.stack([windows[(first + j) % len(windows)] for j in range(b_local)])
    out.append(_to_inputs_targets(rows))
  return out


def eval_sets(cfg: DataConfig, n_batches: int, process_index: int = 0,
              process_count: int = 1) -> dict[str, list[dict[str, np.ndarray]]]:
  """{'mixI': that component's eval_batches} for a mixture (data.mixture), else {'': eval_batches}."""
  parts = mixture_components(cfg)
  if not parts:
    return {"": eval_batches(cfg, n_batches, process_index, process_count)}
  return {name: eval_batches(part, n_batches, process_index, process_count) for name, part, _ in parts}
