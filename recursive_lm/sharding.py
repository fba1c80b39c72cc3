"""Device mesh, the logical-axis -> mesh-axis table, and sharded creation.

Mesh axes: data, fsdp, tensor, expert. Model code names logical axes only
(`recursive_lm.axes`); this table decides where they live. The batch is split
over every data-parallel axis (data, fsdp, expert), so a mesh of any shape
consumes the whole global batch.

  logical    replicated  data   fsdp   fsdp_tensor   fsdp_tensor_expert
  ---------  ----------  -----  -----  ------------  ------------------
  batch      -           dp     dp     dp            dp
  embed      -           -      fsdp   fsdp          fsdp
  heads      -           -      -      tensor        tensor
  kv_heads   -           -      -      tensor        tensor
  mlp        -           -      -      tensor        tensor
  vocab      -           -      -      tensor        tensor
  experts    -           -      -      -             expert
  (others)   -           -      -      -             -

  dp = (data, fsdp, expert)

Activations follow the same table through `constrain` (a no-op outside
`under_mesh`); the residual stream between stages is pinned to batch-sharded
rows with D whole (`constrain_residual`).
"""

from __future__ import annotations

import contextlib
from typing import Callable
import functools
import math

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from recursive_lm import axes
from recursive_lm.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "expert")
DATA_PARALLEL = ("data", "fsdp", "expert")

_TENSOR = {axes.HEADS: "tensor", axes.KV_HEADS: "tensor", axes.MLP: "tensor", axes.VOCAB: "tensor"}
PRESETS: dict[str, dict[str, str | tuple | None]] = {
    "replicated": {},
    "data": {axes.BATCH: DATA_PARALLEL},
    "fsdp": {axes.BATCH: DATA_PARALLEL, axes.EMBED: "fsdp"},
    "fsdp_tensor": {axes.BATCH: DATA_PARALLEL, axes.EMBED: "fsdp", **_TENSOR},
    "fsdp_tensor_expert": {axes.BATCH: DATA_PARALLEL, axes.EMBED: "fsdp", **_TENSOR, axes.EXPERTS: "expert"},
}


def rules(preset: str) -> tuple[tuple[str, str | tuple | None], ...]:
  """Logical axis rules for nnx.logical_axis_rules; every glossary axis is listed."""
  table = PRESETS[preset]
  return tuple((name, table.get(name)) for name in axes.ALL)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
  sizes = [getattr(cfg, a) for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise ConfigError(f"mesh: fixed axes {dict(zip(MESH_AXES, sizes))} (product {known}) do not divide "
                        f"the {n_devices} devices")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ConfigError(f"mesh: {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                      f"{n_devices} are present")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  # Auto axes: sharding follows the logical rules and GSPMD propagation.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def data_parallel_size(mesh) -> int:
  return math.prod(mesh.shape[a] for a in DATA_PARALLEL)


def batch_sharding(mesh, preset: str) -> NamedSharding:
  """[B, T] arrays: rows over the data-parallel axes (replicated for 'replicated')."""
  return NamedSharding(mesh, P(None if preset == "replicated" else DATA_PARALLEL, None))


def check_batch(batch_size: int, mesh, preset: str, grad_accum: int = 1) -> None:
  """Every micro-batch (batch_size / grad_accum rows) must split evenly over the data-parallel devices."""
  dp = 1 if preset == "replicated" else data_parallel_size(mesh)
  micro = batch_size // grad_accum
  if micro % dp:
    rows = (f"data.batch_size={batch_size}" if grad_accum == 1 else
            f"data.batch_size={batch_size} / optim.grad_accum={grad_accum} = {micro} rows per micro-batch")
    raise ConfigError(f"{rows} is not divisible by the data-parallel size {dp} = data*fsdp*expert of mesh "
                      f"{dict(mesh.shape)}")


def _check_divisible(abs_state, mesh, rule_list) -> None:
  table = dict(rule_list)
  for path, var in nnx.to_flat_state(abs_state):
    names = var.get_metadata().get("out_sharding") or ()
    for dim, name in zip(var.shape, names):
      if name is not None and name not in table:
        raise ConfigError(f"parameter {'.'.join(map(str, path))}: logical axis {name!r} is not in the sharding table")
      target = table.get(name)
      size = math.prod(mesh.shape[a] for a in ((target,) if isinstance(target, str) else (target or ())))
      if dim % size:
        raise ConfigError(f"parameter {'.'.join(map(str, path))}: dim {dim} (logical {name!r}) is not divisible "
                          f"by mesh axis {target!r} of size {size}")


def create_sharded(ctor, mesh, preset: str):
  """Build `ctor()` (a module or tuple of modules) with every array created in
  place on its shards: shapes come from eval_shape, values from one jit whose
  out_shardings follow the logical rules, so no device ever holds a full copy
  of a sharded parameter."""
  rule_list = rules(preset)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rule_list), nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(ctor)
    graphdef, abs_state = nnx.split(abstract)
    _check_divisible(abs_state, mesh, rule_list)
    shardings = nnx.get_named_sharding(abs_state, mesh)
    state = jax.jit(lambda: nnx.state(ctor()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def abstract_sharded(ctor, mesh, preset: str):
  """(graphdef, abstract state whose leaves carry shardings): restore targets."""
  rule_list = rules(preset)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rule_list), nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(ctor)
    graphdef, abs_state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(abs_state, mesh)
  add = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  return graphdef, jax.tree.map(add, abs_state, shardings)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """with_sharding_constraint by logical axis names (None: unsharded), mapped
  through the active `nnx.logical_axis_rules`.

  A no-op unless traced under an Auto `jax.set_mesh` *and* logical rules (see
  `under_mesh`): models built and run without a mesh (unit tests, sampling on
  one device) are untouched. Also a no-op when a dim does not divide its mesh
  axes (e.g. a batch of 1 while decoding).
  """
  mesh = jax.sharding.get_abstract_mesh()
  logical = flax_spmd.get_logical_axis_rules()
  if mesh.empty or not logical or not mesh.are_all_axes_auto:
    return x
  table = dict(logical)
  spec = []
  for dim, name in zip(x.shape, names):
    target = None if name is None else table.get(name)
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    if dim % math.prod(mesh.shape[a] for a in mesh_axes):
      return x
    spec.append(target)
  return jax.lax.with_sharding_constraint(x, P(*spec))


def constrain_residual(x: jax.Array) -> jax.Array:
  """The residual stream x [B, ...] at a stage boundary: rows over the batch
  rule's mesh axes, every other axis whole (the FSDP layout: fsdp shards
  weights, not activations; tensor parallelism lives inside a block).

  Without it GSPMD follows the fsdp-sharded weights and keeps x sharded on D
  over fsdp with rows split over `data` only, so fsdp acts as a second tensor
  axis (an activation all-reduce per matmul) instead of splitting the batch.
  """
  return constrain(x, (axes.BATCH,) + (None,) * (x.ndim - 1))


@contextlib.contextmanager
def mesh_context(mesh, preset: str):
  """The mesh and the preset's logical rules, for tracing model code whose
  activation constraints (`constrain`) should apply."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules(preset)):
    yield


def under_mesh(fn, mesh, preset: str):
  """`fn` called inside `mesh_context(mesh, preset)`."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with mesh_context(mesh, preset):
      return fn(*args, **kwargs)

  return wrapped


def global_batch(local: dict[str, np.ndarray], mesh, preset: str) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays sharded over the data-parallel axes."""
  sharding = batch_sharding(mesh, preset)
  n = jax.process_count()
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n,) + v.shape[1:])
          for k, v in local.items()}


# ----------------------------------------------------------------------------
# Per-shard execution (the MoE layers' and the GPU attention's data-parallel path).


def batch_axes() -> tuple[tuple[str, ...], int]:
  """Mesh axes of the batch logical rule and their total size (((), 1) without a mesh and rules)."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = flax_spmd.get_logical_axis_rules()
  if mesh.empty or not rules or not mesh.are_all_axes_auto:
    return (), 1
  target = dict(rules).get(axes.BATCH)
  names = (target,) if isinstance(target, str) else tuple(target or ())
  return names, math.prod(mesh.shape[a] for a in names)


def data_parallel(fn: Callable, n_batched: int, out_batched: tuple[bool, ...]) -> Callable:
  """Run fn(*batched, *replicated) per batch shard when the batch is sharded.

  The first `n_batched` arguments have the batch on axis 0; outputs flagged in
  `out_batched` do too, the others are sums over tokens (psum-ed over shards).
  A plain call without a mesh, or when the batch does not divide.
  """

  def wrapped(*args):
    names, size = batch_axes()
    if size == 1 or args[0].shape[0] % size:
      return fn(*args)

    def local(*a):
      outs = fn(*a)
      return tuple(o if bat else jax.lax.psum(o, names) for o, bat in zip(outs, out_batched))

    in_specs = tuple(P(names) if i < n_batched else P() for i in range(len(args)))
    out_specs = tuple(P(names) if bat else P() for bat in out_batched)
    return jax.shard_map(local, in_specs=in_specs, out_specs=out_specs, axis_names=set(names),
                         check_vma=False)(*args)

  return wrapped
