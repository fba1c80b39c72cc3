"""Expert dispatch: the grouped matmuls that sigma-MoE and SwitchHead share.

Routing yields A "assignments" (token, expert) with a gate value
each. Assignments are sorted by group (expert) and laid out in row blocks
that each belong to one group. A grouped linear layer is then, per block j
with group g_j:

    out[dst[i]] += gate[i] * (x[src[i]] @ W[g_j])      for the rows i of block j

  loop    (CPU default) a `fori_loop` over the *used* blocks only (a traced
          trip count), gathering its rows, with a custom VJP whose backward is
          the same loop (dx, dW, dgate: two matmuls per block). sigma-MoE runs
          both expert layers in one loop (`expert_mlp`: the [b, S] hidden block
          stays in cache; pre-activations are kept only when differentiating)
          over a tiered layout (`plan_tiers`), several blocks per iteration
          (`_block_loop`): each group in as many blocks of
          the largest size (model.moe.block_rows, 512) as fit plus at most one
          block of each smaller power of two down to 32 rows, because
          block-sized matmuls are up to 1.7x faster per row at 512 rows than
          at 128 while padding stays under 32 rows per group. SwitchHead uses
          single-size blocks (`plan_layout`). Exact; never touches unused experts.
  blocks  (GPU default) single-group blocks of `batched_block_rows` rows,
          every block of the static worst case ceil(A / b) + G - 1 computed
          in one batched matmul with its group's weights gathered (padding
          at most about a quarter). Plain autodiff. On an H100 22x faster
          than `ragged` for forward+backward at the 44M sizes.
  ragged  `jax.lax.ragged_dot` on the sorted rows (no padding). On XLA:CPU
          it lowers to a dense masked product over all groups (2.3 GFLOP/s
          vs 190 for a plain matmul of the same FLOPs at E=32, i.e. E times
          the work), and on XLA:GPU (jax 0.11.2) its weight gradient does too
          (f32[E, A, D]: out of memory at 44M), so `auto` picks `loop` on CPU
          and `blocks` on GPU.
  megablox  (TPU, `auto` there) the Pallas TPU grouped matmul
          (`jax.experimental.pallas.ops.tpu.megablox.gmm`, its custom VJP:
          `gmm` with the transposed weights for dx, `tgmm` for dW) on the
          sorted rows padded to a multiple of the row tile (`megablox_rows`);
          the padding rows join the last group with gate 0. Tiles may
          straddle groups (the kernel masks them); empty groups are skipped
          forward and get a zero weight gradient. Tested in Pallas interpret
          mode on CPU; never measured on a TPU.
  ragged_mgpu  (Hopper GPUs, explicit only) the Mosaic GPU ragged dot
          (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`, forward and
          dx with the transposed weights; `transposed_ragged_dot_mgpu` for
          dW) in a custom VJP. bfloat16/float16 only, both dims of every
          grouped matmul multiples of 64 (`mgpu_problem`). Mosaic GPU has no
          CPU interpret mode for its TMA copies (jax 0.10.2: "No state
          discharge rule implemented for primitive: copy_gmem_to_smem"), so
          it is tested only on a GPU (tests/test_moe_kernels.py, run by
          experiments/gpu_benchmarks/run.sh).
  dense   every expert for every token, unselected ones weighted 0: the
          reference the others are tested against (E/K times the work).

  Rejected on CPU: gathering each token's expert weights (weight traffic of
  D*S per token-expert, memory-bound); `blocks` (all padding blocks computed:
  0.2-0.3x of the dense MLP); a capacity-style [E, C, D] batched matmul
  (XLA:CPU runs it at ~105 GFLOP/s, about one core); running token halves on
  two simulated CPU devices (no faster: they share the cores); XLA's XNNPACK,
  YNNPACK and oneDNN dot options (no faster, or slower).
  Measured with `recursive_lm.model.moe_bench` at the 44M layer (D 412, E 155,
  K 12, S 128, a 2-core CPU), against a dense ReLU MLP of width K*S computed
  with the model's `linear` (the same active FLOPs), forward+backward /
  forward: 0.65x / 0.51x at 4096 tokens per call, 0.73x / 0.70x at 16384 and
  0.75x / 0.73x at 65536 (the 44M preset's batch). The rest is block size:
  an expert gets ~317 rows at 4096 tokens, and matmuls of 32-128 rows run at
  65-120 GFLOP/s against ~145 for 512 rows and 150-190 for the dense MLP;
  routing (top-k, the sort) adds ~5 %.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from recursive_lm.config import MOE_DISPATCH, ConfigError

DISPATCH = MOE_DISPATCH
# What `auto` picks per backend (see the module docstring for the measurements).
AUTO = {"cpu": "loop", "gpu": "blocks", "tpu": "megablox"}
# The Pallas dispatches: the backends that run them and the modules of the installed jax they need
# (loop, blocks, ragged and dense are plain jax: every backend).
RUNS_ON = {"megablox": ("tpu",), "ragged_mgpu": ("gpu",)}
MODULES = {"megablox": ("jax.experimental.pallas.ops.tpu.megablox",),
           "ragged_mgpu": ("jax.experimental.pallas.ops.gpu.ragged_dot_mgpu",
                           "jax.experimental.pallas.ops.gpu.transposed_ragged_dot_mgpu")}


def _backend_name(backend: str | None) -> str:
  name = backend or jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def kernel_missing(mode: str) -> str | None:
  """Why the installed jax cannot import dispatch `mode`'s kernel (None: it can, or it needs none)."""
  for module in MODULES.get(mode, ()):
    try:
      importlib.import_module(module)
    except ImportError as e:
      return f"jax {jax.__version__} has no {module} ({e})"
  return None


def choose_dispatch(mode: str, backend: str | None = None) -> tuple[str, str]:
  """(dispatch, why auto did not take its first choice or '') for model.moe.dispatch=`mode` on `backend`
  (default: jax's). ConfigError for a dispatch the backend or the installed jax cannot run."""
  if mode not in DISPATCH:
    raise ConfigError(f"model.moe.dispatch={mode!r} is not one of {list(DISPATCH)}")
  backend = _backend_name(backend)
  if mode == "auto":
    mode = AUTO.get(backend, "blocks")
    problem = kernel_missing(mode)
    if problem:  # megablox missing from this jax: ragged_dot is what TPUs ran before it
      return "ragged", f"megablox dispatch not used: {problem}"
    return mode, ""
  if mode in RUNS_ON and backend not in RUNS_ON[mode]:
    works = [m for m in DISPATCH[1:] if backend in RUNS_ON.get(m, (backend,))]
    raise ConfigError(f"model.moe.dispatch={mode!r} does not run on the {backend} backend (it runs on "
                      f"{'/'.join(RUNS_ON[mode])}; on {backend} use one of {works} or 'auto')")
  problem = kernel_missing(mode)
  if problem:
    raise ConfigError(f"model.moe.dispatch={mode!r} is not available on the {backend} backend: {problem}; "
                      f"use 'auto' or one of {[m for m in DISPATCH[1:] if m not in RUNS_ON]}")
  return mode, ""


def resolve_dispatch(mode: str, backend: str | None = None) -> str:
  """`choose_dispatch`'s dispatch (the model's build logs it with the other kernels: `kernels.resolved`)."""
  return choose_dispatch(mode, backend)[0]


# ----------------------------------------------------------------------------
# Layout: assignments sorted by group, in single-group row blocks.


class Layout(NamedTuple):
  """Where each assignment sits in the grouped row layout of P = n_blocks_max * block rows.

  slot: [P] assignment id of each row (0 on padding rows); valid: [P] bool;
  block_group: [n_blocks_max] group of each block; n_blocks: scalar, blocks in
  use; group_sizes: [G] assignments per group (ragged). Rows per block:
  `block` (P / n_blocks_max; 1 for the ragged mode).
  """

  slot: jax.Array
  valid: jax.Array
  block_group: jax.Array
  n_blocks: jax.Array
  group_sizes: jax.Array

  @property
  def block(self) -> int:
    return self.slot.shape[0] // self.block_group.shape[0]


def block_rows(n_assign: int, n_groups: int, cap: int) -> int:
  """Rows per block: the power of two >= the mean group size, in [8, cap].

  Large batches get `cap`-row blocks (full matmuls); decoding (a few tokens)
  gets 8-row blocks, so padding stays near one block per used group.
  """
  mean = max(1, -(-n_assign // n_groups))
  return int(min(cap, max(8, 1 << (mean - 1).bit_length())))


def sort_by_group(group: jax.Array, n_groups: int) -> tuple[jax.Array, jax.Array]:
  """Stable sort of assignments by group: (sorted group ids [A], assignment order [A]).

  Sorts one packed int32 key group * A + index when it fits (5x faster on
  XLA:CPU than sorting the (group, index) pair), else the pair.
  """
  a = group.shape[0]
  index = jnp.arange(a, dtype=jnp.int32)
  if n_groups * a < 2**31:
    key = jax.lax.sort(group * a + index)
    return key // a, key % a
  return jax.lax.sort((group, index), num_keys=1, is_stable=True)


def batched_block_rows(n_assign: int, n_groups: int, cap: int) -> int:
  """Rows per block of the batched ('blocks') dispatch, which computes every block of the static
  worst case ceil(A / b) + G - 1: the power of two <= A / (4 G), in [8, cap], so at most about a
  quarter of the computed rows are padding."""
  quarter = max(1, n_assign // (4 * n_groups))
  return int(min(cap, max(8, 1 << (quarter.bit_length() - 1))))


def megablox_rows(n_assign: int, n_groups: int, cap: int) -> int:
  """Row tile of the megablox dispatch: `block_rows` capped at 128 (the kernel's default tile), at least
  16 (a TPU bfloat16 tile holds 16 sublanes) unless `cap` is smaller. Tiles straddling a group boundary
  are computed once per group, so tiles near the mean group size waste least."""
  return max(min(16, cap), block_rows(n_assign, n_groups, min(cap, 128)))


def plan_layout(group: jax.Array, n_groups: int, mode: str, cap: int = 128) -> Layout:
  """Layout for assignments with group ids `group` [A] (int32 in [0, n_groups)); mode 'loop',
  'blocks', 'ragged', 'megablox' or 'ragged_mgpu' (the dense reference needs none)."""
  a = group.shape[0]
  group = group.astype(jnp.int32)
  sizes = jnp.zeros((n_groups,), jnp.int32).at[group].add(1)
  sorted_group, order = sort_by_group(group, n_groups)
  if mode in ("ragged", "ragged_mgpu"):
    return Layout(order, jnp.ones((a,), bool), sorted_group, jnp.int32(0), sizes)
  if mode == "megablox":  # sorted rows padded to whole tiles; block_group: the group of each tile's first row
    t = megablox_rows(a, n_groups, cap)
    p = -(-a // t) * t
    valid = jnp.arange(p) < a
    slot = jnp.zeros((p,), jnp.int32).at[:a].set(order)
    first = jnp.concatenate([sorted_group, jnp.full((p - a,), n_groups - 1, jnp.int32)])[::t]
    return Layout(slot, valid, first.astype(jnp.int32), jnp.int32(p // t), sizes)
  b = batched_block_rows(a, n_groups, cap) if mode == "blocks" else block_rows(a, n_groups, cap)
  padded = (sizes + b - 1) // b * b
  pend = jnp.cumsum(padded)
  start = jnp.cumsum(sizes) - sizes
  dest = (pend - padded)[sorted_group] + jnp.arange(a, dtype=jnp.int32) - start[sorted_group]
  # sum_g ceil(n_g / b) <= ceil(A / b) + (non-empty groups) - 1
  nb = max(1, -(-a // b) + min(n_groups, a) - 1)
  slot = jnp.full((nb * b,), a, jnp.int32).at[dest].set(order)
  valid = slot < a
  block_group = jnp.minimum(jnp.searchsorted(pend, jnp.arange(nb, dtype=jnp.int32) * b, side="right"), n_groups - 1)
  return Layout(jnp.where(valid, slot, 0), valid, block_group.astype(jnp.int32), pend[-1] // b, sizes)


class Tiers(NamedTuple):
  """Assignments sorted by group in blocks of several sizes, in one row array of R rows.

  slot, valid: [R] as in Layout. Per tier i (largest block first): rows
  start[i] (traced) onwards hold count[i] (traced) blocks of block[i] (static)
  rows; group[i]: [max blocks of the tier] group of each block.
  group_sizes: [G] assignments per group.
  """

  slot: jax.Array
  valid: jax.Array
  start: tuple
  count: tuple
  group: tuple
  block: tuple
  group_sizes: jax.Array


def plan_tiers(group: jax.Array, n_groups: int, cap: int = 512, granule: int = 32) -> Tiers:
  """The loop layout of sigma-MoE: assignments sorted by group, in blocks of several sizes.

  Block-sized matmuls on CPU get much faster with more rows (at the 44M
  sizes, 2.5 us per row in 128-row blocks, 1.5 in 512-row blocks), but one
  large block size pads every group by half a block on average. Here each
  group's count is rounded up to a multiple of the smallest tier, then split
  into as many blocks of the largest tier as fit plus at most one block of
  each smaller tier (the binary digits of the rest): padding stays below
  `granule` rows per group while most rows run in large blocks. Tier sizes:
  the powers of two from `block_rows(A, G, cap)` down to min(that, granule).
  """
  a = group.shape[0]
  group = group.astype(jnp.int32)
  top = block_rows(a, n_groups, cap)
  tiers = tuple(top >> i for i in range(top.bit_length() - min(top, granule).bit_length() + 1))
  small = tiers[-1]
  sizes = jnp.zeros((n_groups,), jnp.int32).at[group].add(1)
  sorted_group, order = sort_by_group(group, n_groups)
  rank = jnp.arange(a, dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[sorted_group]  # rank within its group
  padded = (sizes + small - 1) // small * small
  total = a + n_groups * (small - 1)  # static bound on sum(padded): the rows of the layout
  dest = jnp.zeros((a,), jnp.int32)
  done = jnp.zeros((n_groups,), jnp.int32)  # rows of each group placed in earlier tiers
  offset = jnp.zeros((), jnp.int32)  # rows used by earlier tiers
  starts, counts, groups = [], [], []
  for i, t in enumerate(tiers):
    rows = (padded // t) * t if i == 0 else ((padded // t) % 2) * t  # [G] rows of each group in this tier
    ends = jnp.cumsum(rows)
    lo = done[sorted_group]
    inside = (rank >= lo) & (rank < lo + rows[sorted_group])
    dest = jnp.where(inside, offset + ends[sorted_group] - rows[sorted_group] + rank - lo, dest)
    nb = max(1, total // t if i == 0 else min(n_groups, total // t))
    groups.append(jnp.minimum(jnp.searchsorted(ends, jnp.arange(nb, dtype=jnp.int32) * t, side="right"),
                              n_groups - 1).astype(jnp.int32))
    starts.append(offset)
    counts.append(ends[-1] // t)
    offset = offset + ends[-1]
    done = done + rows
  slot = jnp.full((total,), a, jnp.int32).at[dest].set(order)
  valid = slot < a
  return Tiers(jnp.where(valid, slot, 0), valid, tuple(starts), tuple(counts), tuple(groups), tiers, sizes)


# ----------------------------------------------------------------------------
# The loop kernel: out[dst] += gate * (x[src] @ W[g]) over used blocks.


def _block(a: jax.Array, start: jax.Array, b: int) -> jax.Array:
  """Rows [start, start + b) of `a`."""
  return jax.lax.dynamic_slice_in_dim(a, start, b, 0)


def _rows(a: jax.Array, idx: jax.Array | None, j: jax.Array, b: int) -> jax.Array:
  """Block j's rows of `a`: gathered by idx[j*b:(j+1)*b], or a contiguous slice when idx is None."""
  return _block(a, j * b, b) if idx is None else a[_block(idx, j * b, b)]


def _put(buf: jax.Array, idx: jax.Array | None, j: jax.Array, b: int, val: jax.Array) -> jax.Array:
  if idx is None:
    return jax.lax.dynamic_update_slice_in_dim(buf, val, j * b, 0)
  return buf.at[jax.lax.dynamic_slice_in_dim(idx, j * b, b, 0)].add(val)


# Rows per loop iteration: each iteration runs up to STEP_ROWS // b blocks
# that do not depend on each other, which XLA:CPU runs faster than one block
# per iteration (measured at the 44M sizes, forward: 128-row blocks 80 -> 126
# GFLOP/s, 512-row 133 -> 150; sigma-MoE forward+backward 11.8k -> 14.6k tokens/s).
STEP_ROWS = 1024
STEP_BLOCKS = 4  # at most this many blocks per iteration (compile time grows with it)


def _block_loop(n_blocks: jax.Array, b: int, block_fn: Callable, add: Callable, carry):
  """carry = add(carry, j, block_fn(j)) for j in [0, n_blocks), STEP_ROWS // b blocks per iteration.

  block_fn must not read the carry, so the blocks of one iteration are
  independent; the leftover blocks run one per iteration (nothing is padded).
  """
  per = max(1, min(STEP_BLOCKS, STEP_ROWS // b))

  def step(i, carry):
    outs = [(i * per + u, block_fn(i * per + u)) for u in range(per)]
    for j, out in outs:
      carry = add(carry, j, out)
    return carry

  carry = jax.lax.fori_loop(0, n_blocks // per, step, carry)
  return jax.lax.fori_loop(n_blocks // per * per, n_blocks, lambda j, c: add(c, j, block_fn(j)), carry)


def _loop_forward(x, w, gate, src, dst, block_group, n_blocks, b, n_out):
  out = jnp.zeros((gate.shape[0] if dst is None else n_out, w.shape[2]), jnp.float32)

  def block(j):
    we = jax.lax.dynamic_index_in_dim(w, block_group[j], 0, keepdims=False)
    return jnp.dot(_rows(x, src, j, b), we, preferred_element_type=jnp.float32) * _rows(gate, None, j, b)[:, None]

  return _block_loop(n_blocks, b, block, lambda out, j, yb: _put(out, dst, j, b, yb), out).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _loop_gmm(x, w, gate, src, dst, block_group, n_blocks, b, n_out):
  return _loop_forward(x, w, gate, src, dst, block_group, n_blocks, b, n_out)


def _loop_gmm_fwd(x, w, gate, src, dst, block_group, n_blocks, b, n_out):
  out = _loop_forward(x, w, gate, src, dst, block_group, n_blocks, b, n_out)
  return out, (x, w, gate, src, dst, block_group, n_blocks)


def _loop_gmm_bwd(b, n_out, res, g):
  x, w, gate, src, dst, block_group, n_blocks = res
  g = g.astype(x.dtype)

  def block(j):
    e = block_group[j]
    xb, gyb = _rows(x, src, j, b), _rows(g, dst, j, b)
    gb = _rows(gate, None, j, b)
    we = jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False)
    dxb = jnp.dot(gyb, we.T, preferred_element_type=jnp.float32)  # d(x @ W) rows, before the gate
    dwe = jnp.dot(xb.T, (gyb * gb[:, None].astype(gyb.dtype)), preferred_element_type=jnp.float32)
    return e, dwe, jnp.sum(xb.astype(jnp.float32) * dxb, -1), dxb * gb[:, None].astype(jnp.float32)

  def add(carry, j, res):
    dx, dw, dgate = carry
    e, dwe, dgb, dxb = res
    return _put(dx, src, j, b, dxb), dw.at[e].add(dwe), jax.lax.dynamic_update_slice_in_dim(dgate, dgb, j * b, 0)

  init = (jnp.zeros(x.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32), jnp.zeros(gate.shape, jnp.float32))
  dx, dw, dgate = _block_loop(n_blocks, b, block, add, init)
  return dx.astype(x.dtype), dw.astype(w.dtype), dgate.astype(gate.dtype), None, None, None, None


_loop_gmm.defvjp(_loop_gmm_fwd, _loop_gmm_bwd)


def _mlp_forward(x, keys, values, gate, token, starts, counts, groups, blocks, save):
  out = jnp.zeros((x.shape[0], values.shape[2]), jnp.float32)
  pre_buf = jnp.zeros((gate.shape[0], keys.shape[2]), x.dtype) if save else None
  for start, n_blocks, block_group, b in zip(starts, counts, groups, blocks):
    def block(j, start=start, block_group=block_group, b=b):
      e, r = block_group[j], start + j * b
      rows = _block(token, r, b)
      pre = jnp.dot(x[rows], jax.lax.dynamic_index_in_dim(keys, e, 0, False),
                    preferred_element_type=jnp.float32).astype(x.dtype)
      h = jax.nn.relu(pre) * _block(gate, r, b)[:, None]
      return rows, pre, jnp.dot(h, jax.lax.dynamic_index_in_dim(values, e, 0, False),
                                preferred_element_type=jnp.float32)

    def add(carry, j, res, start=start, b=b):
      out, pre_buf = carry
      rows, pre, yb = res
      if save:
        pre_buf = jax.lax.dynamic_update_slice_in_dim(pre_buf, pre, start + j * b, 0)
      return out.at[rows].add(yb), pre_buf

    out, pre_buf = _block_loop(n_blocks, b, block, add, (out, pre_buf))
  return out.astype(x.dtype), pre_buf


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _mlp_loop(x, keys, values, gate, token, starts, counts, groups, blocks):
  """out[token[i]] += gate[i] * relu(x[token[i]] @ keys[g]) @ values[g] over the used blocks of
  every tier of a `Tiers` layout (gate, token: [R] rows; starts, counts, groups, blocks: per tier).
  Both expert layers run in one loop (the [b, S] hidden block stays in cache). Pre-activations
  are kept for the backward pass only when differentiating."""
  return _mlp_forward(x, keys, values, gate, token, starts, counts, groups, blocks, False)[0]


def _mlp_loop_fwd(x, keys, values, gate, token, starts, counts, groups, blocks):
  out, pre_buf = _mlp_forward(x, keys, values, gate, token, starts, counts, groups, blocks, True)
  return out, (x, keys, values, gate, token, starts, counts, groups, pre_buf)


def _mlp_loop_bwd(blocks, res, g):
  x, keys, values, gate, token, starts, counts, groups, pre_buf = res
  g = g.astype(x.dtype)
  f32 = jnp.float32

  # Weight gradients accumulate with scatter-adds (.at[e].add), which XLA
  # updates in place; a dynamic slice + add + update of the same buffer copies
  # the whole [E, D, S] array once several blocks share an iteration.
  carry = (jnp.zeros(x.shape, f32), jnp.zeros(keys.shape, f32), jnp.zeros(values.shape, f32),
           jnp.zeros(gate.shape, f32))
  for start, n_blocks, block_group, b in zip(starts, counts, groups, blocks):
    def block(j, start=start, block_group=block_group, b=b):
      e, r = block_group[j], start + j * b
      rows = _block(token, r, b)
      xb, gyb, gb = x[rows], g[rows], _block(gate, r, b)[:, None]
      ke = jax.lax.dynamic_index_in_dim(keys, e, 0, False)
      ve = jax.lax.dynamic_index_in_dim(values, e, 0, False)
      pre = _block(pre_buf, r, b)
      h = jax.nn.relu(pre)
      dh = jnp.dot(gyb, ve.T, preferred_element_type=f32)  # d(gate * h)
      dve = jnp.dot((h * gb).T, gyb, preferred_element_type=f32)
      dgb = jnp.sum(dh * h.astype(f32), -1)
      dpre = jnp.where(pre > 0, dh * gb.astype(f32), 0).astype(x.dtype)
      dke = jnp.dot(xb.T, dpre, preferred_element_type=f32)
      return e, rows, dve, dgb, dke, jnp.dot(dpre, ke.T, preferred_element_type=f32)

    def add(carry, j, res, start=start, b=b):
      dx, dk, dv, dgate = carry
      e, rows, dve, dgb, dke, dxb = res
      return (dx.at[rows].add(dxb), dk.at[e].add(dke), dv.at[e].add(dve),
              jax.lax.dynamic_update_slice_in_dim(dgate, dgb, start + j * b, 0))

    carry = _block_loop(n_blocks, b, block, add, carry)
  dx, dk, dv, dgate = carry
  none = tuple(None for _ in blocks)
  return (dx.astype(x.dtype), dk.astype(keys.dtype), dv.astype(values.dtype), dgate.astype(gate.dtype), None,
          none, none, none)


_mlp_loop.defvjp(_mlp_loop_fwd, _mlp_loop_bwd)


# ----------------------------------------------------------------------------
# The Pallas grouped matmuls: megablox (TPU) and the Mosaic GPU ragged dot (Hopper).


@functools.lru_cache(maxsize=None)
def _megablox_tiling(tm: int):
  """megablox's tiling callback (m, k, n) -> (tm, tk, tn), one object per row tile (it is a static
  argument of the kernel's custom VJP). k/n tiles of 128 (the kernel's default) where 128 divides
  the dim, else the whole dim (a TPU block is a multiple of 128 lanes or the full dim, and whole
  tiles need no edge masking: the 44M layer's D is 412); the backward calls it with its own
  (m, k, n), so dx and dW get tiles that fit their shapes too."""
  tile = lambda dim: 128 if dim % 128 == 0 else dim
  return lambda m, k, n: (tm, tile(k), tile(n))


def _megablox_gmm(xs: jax.Array, w: jax.Array, layout: Layout, interpret: bool) -> jax.Array:
  """xs [P, d_in] in layout order @ w [G, d_in, d_out] per group -> [P, d_out] (x's dtype, float32
  accumulation). The P - A padding rows join the last group so every row is written."""
  from jax.experimental.pallas.ops.tpu import megablox
  sizes = layout.group_sizes.astype(jnp.int32)
  sizes = sizes.at[-1].add(xs.shape[0] - jnp.sum(sizes))
  return megablox.gmm(xs, w, sizes, preferred_element_type=xs.dtype, tiling=_megablox_tiling(layout.block),
                      interpret=interpret)


MGPU_DTYPES = ("bfloat16", "float16")
MGPU_BLOCK_K = 64  # the contraction tile of both Mosaic GPU kernels (and of jax's own tuning sweep)


def mgpu_problem(d_in: int, d_out: int, dtype) -> str | None:
  """Why the Mosaic GPU ragged dot cannot take x [A, d_in] @ w [G, d_in, d_out] in `dtype` (None: it can):
  the forward contracts d_in, dx contracts d_out, dW tiles both, all in blocks of 64."""
  if jnp.dtype(dtype).name not in MGPU_DTYPES:
    return f"compute dtype {jnp.dtype(dtype).name} (it takes {' or '.join(MGPU_DTYPES)})"
  if d_in % MGPU_BLOCK_K or d_out % MGPU_BLOCK_K:
    return f"a grouped matmul of {d_in} -> {d_out} features (both must be multiples of {MGPU_BLOCK_K})"
  return None


def mgpu_model_problem(cfg) -> str | None:
  """`mgpu_problem` for a MoEUT ModelConfig's grouped matmuls: sigma-MoE D <-> S, SwitchHead D <-> head_dim."""
  dims = [(cfg.d_model, cfg.moe.expert_size)] + ([(cfg.d_model, cfg.head_dim)] if cfg.moe.att_experts > 1 else [])
  problems = [mgpu_problem(d_in, d_out, cfg.compute_dtype) for d_in, d_out in dims]
  return next((p for p in problems if p), None)


def _mgpu_tile(n: int) -> int:
  return 128 if n % 128 == 0 else MGPU_BLOCK_K


def _mgpu_dot(x, w, sizes, transpose_rhs: bool = False):
  """x [A, k] @ w[g] ([G, k, n], or [G, n, k] with transpose_rhs) per group -> [A, n]."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  fn = ragged_dot_mgpu.ragged_dot
  opts = {}
  if transpose_rhs and "transpose_rhs" in inspect.signature(fn).parameters:
    opts["transpose_rhs"] = True
  elif transpose_rhs:  # older versions of the kernel take w[g] as [k, n] only: transpose it here
    w = jnp.swapaxes(w, 1, 2)
  return fn(x, w, group_sizes=sizes, block_m=128, block_n=_mgpu_tile(w.shape[1] if opts else w.shape[2]),
            block_k=MGPU_BLOCK_K, max_concurrent_steps=4, grid_block_n=1, **opts)


@jax.custom_vjp
def _mgpu_gmm(x, w, sizes):
  """x [A, d_in] sorted by group @ w [G, d_in, d_out] -> [A, d_out] (x's dtype, float32 accumulation)."""
  return _mgpu_dot(x, w, sizes)


def _mgpu_gmm_fwd(x, w, sizes):
  return _mgpu_dot(x, w, sizes), (x, w, sizes)


def _mgpu_gmm_bwd(res, g):
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
  x, w, sizes = res
  g = g.astype(x.dtype)
  dx = _mgpu_dot(g, w, sizes, transpose_rhs=True)
  dw = transposed_ragged_dot_mgpu.transposed_ragged_dot(
      x, g, group_sizes=sizes, block_m=_mgpu_tile(x.shape[1]), block_n=_mgpu_tile(g.shape[1]),
      block_k=MGPU_BLOCK_K, max_concurrent_steps=4, grid_block_n=1)
  return dx, dw.astype(w.dtype), None


_mgpu_gmm.defvjp(_mgpu_gmm_fwd, _mgpu_gmm_bwd)


def expert_mlp(x: jax.Array, keys: jax.Array, values: jax.Array, layout, mode: str, token: jax.Array,
               gate: jax.Array, interpret: bool = False) -> jax.Array:
  """sigma-MoE experts: out[token[a]] += gate[a] * relu(x[token[a]] @ keys[g_a]) @ values[g_a].

  x [N, D]; keys [E, D, S]; values [E, S, D]; token, gate [A]; layout of the
  group ids [A]: `plan_tiers` (loop) or `plan_layout` (the others).
  interpret: run a Pallas kernel in interpret mode (tests on CPU).
  """
  keys, values = keys.astype(x.dtype), values.astype(x.dtype)
  if mode == "loop":
    gate_rows = jnp.where(layout.valid, gate[layout.slot].astype(x.dtype), 0)
    return _mlp_loop(x, keys, values, gate_rows, token[layout.slot].astype(jnp.int32), layout.start,
                     layout.count, layout.group, layout.block)
  h = jax.nn.relu(grouped_linear(x, keys, layout, mode, src=token, interpret=interpret))
  return grouped_linear(h, values, layout, mode, dst=token, gate=gate, n_out=x.shape[0], interpret=interpret)


def grouped_linear(x: jax.Array, w: jax.Array, layout: Layout, mode: str, *, src: jax.Array | None = None,
                   dst: jax.Array | None = None, gate: jax.Array | None = None, n_out: int = 0,
                   interpret: bool = False) -> jax.Array:
  """Per assignment a: out[dst[a]] += gate[a] * (x[src[a]] @ w[group[a]]).

  x: [N_in, d_in] rows indexed by `src` [A], or (src=None) already in the
  layout's row order [P, d_in] (the output of an earlier call with dst=None).
  w: [G, d_in, d_out]. dst [A] rows of an [n_out, d_out] output, or None for
  output in the layout's row order [P, d_out] (padding rows are 0).
  gate: [A] (None: 1). interpret: run the megablox kernel in Pallas interpret mode (tests on CPU).
  """
  a = layout.slot.shape[0]
  gate_rows = jnp.ones((a,), x.dtype) if gate is None else gate[layout.slot].astype(x.dtype)
  gate_rows = jnp.where(layout.valid, gate_rows, 0)
  src_rows = None if src is None else src[layout.slot].astype(jnp.int32)
  dst_rows = None if dst is None else dst[layout.slot].astype(jnp.int32)
  w = w.astype(x.dtype)
  if mode == "loop":
    return _loop_gmm(x, w, gate_rows, src_rows, dst_rows, layout.block_group, layout.n_blocks, layout.block, n_out)
  xs = x if src_rows is None else x[src_rows]
  if mode == "blocks":  # one batched matmul over every block of the worst case, each with its group's weights
    nb, b = layout.block_group.shape[0], layout.block
    y = jnp.einsum("nbi,nio->nbo", xs.reshape(nb, b, -1), w[layout.block_group],
                   preferred_element_type=jnp.float32).reshape(nb * b, -1)
  elif mode == "ragged":
    y = jax.lax.ragged_dot(xs, w, layout.group_sizes, preferred_element_type=jnp.float32)
  elif mode == "megablox":
    y = _megablox_gmm(xs, w, layout, interpret)
  elif mode == "ragged_mgpu":
    problem = mgpu_problem(w.shape[1], w.shape[2], x.dtype)
    if problem:
      raise ConfigError(f"model.moe.dispatch='ragged_mgpu' cannot take {problem}; use 'blocks' or 'auto'")
    y = _mgpu_gmm(xs, w, layout.group_sizes.astype(jnp.int32))
  else:
    raise ConfigError(f"grouped_linear: dispatch {mode!r} is not one of {list(DISPATCH[1:-1])}")
  y = y * gate_rows[:, None].astype(jnp.float32)
  if dst_rows is not None:
    y = jnp.zeros((n_out, w.shape[2]), jnp.float32).at[dst_rows].add(y)
  return y.astype(x.dtype)
