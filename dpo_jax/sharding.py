"""Meshes and shardings: the mesh from the config, logical axis names -> mesh axes.

Every array in dpo_jax names its axes logically (`('embed', 'mlp')`, `('batch', 'length')`); a list of
rules kept in the config maps each logical name to mesh axes of the `('data', 'fsdp', 'expert', 'sequence',
'tensor')` mesh.
Nothing here reads a mesh from context: the mesh is always passed in, and a rule that cannot be applied
(an unknown name, a dimension that the mesh axes do not divide) is an error, never a silent replicate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")

# A rule maps one logical axis name to None (replicated), a mesh axis, or a tuple of mesh axes.
Rules = tuple[tuple[str, Any], ...]

# The default rules (configs/default.py's `sharding.rules`); the first matching rule wins.
# Params: FSDP shards the embedding dimension, tensor parallelism shards heads / MLP / vocab, expert parallelism
# the experts of MoE layers (dpo_jax/moe.py; 'expert' is size 1 unless config.mesh.expert > 1).
# Activations: the batch is split over data, fsdp and expert (expert parallelism exchanges each device's own
# tokens, and the dense layers see the expert axis as more data parallelism), the tokens of each sequence over 'sequence' (context
# parallelism, dpo_jax/context_parallel.py; size 1 unless config.mesh.sequence > 1); 'act_embed' (the residual
# stream) is replicated.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", "sequence"),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("expert", "expert"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes for `MESH_AXES` from `sizes` (one of them may be -1 = all remaining devices)."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the mesh axes are {MESH_AXES}.")
  shape = [int(sizes.get(name, 1)) for name in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1 (= the rest), got {dict(zip(MESH_AXES, shape))}.")
  fixed = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}.")
  if -1 in shape:
    if num_devices % fixed:
      raise ValueError(
          f"mesh: {num_devices} devices cannot be split as {dict(zip(MESH_AXES, shape))}: the fixed axes "
          f"multiply to {fixed}, which does not divide {num_devices}. Change config.mesh.")
    shape[shape.index(-1)] = num_devices // fixed
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh: {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but {num_devices} are "
        f"available. Set one axis of config.mesh to -1 to use the rest.")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `MESH_AXES` mesh over `devices` (default: all devices of all processes).

  Axis types are Auto (GSPMD propagation between the shardings we declare at jit boundaries and the
  constraints in the model), so the same code runs on 1 CPU, emulated CPUs, GPUs and TPU pods.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(sizes, len(devices))
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:
    return _multislice_mesh(shape, devices, slices)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
  except NotImplementedError:
    # A TPU torus whose physical axes no mesh axis can take whole, e.g. sequence=8 on v6e-256's 16x16 chips
    # (jax.make_mesh splits physical axes for v5e only): let mesh axes span parts of physical ones.
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _multislice_mesh(shape: tuple[int, ...], devices: Sequence[jax.Device], slices: int) -> Mesh:
  """TPU slices joined by the data-center network (DCN): 'data' spans the slices, every other axis stays inside
  one slice on its fast interconnect (ICI), so only the gradient all-reduce crosses the DCN (MaxText's default
  multi-slice layout: `dcn_data_parallelism` = the slice count)."""
  from jax.experimental import mesh_utils
  data = shape[MESH_AXES.index("data")]
  if data % slices:
    raise ValueError(f"mesh: the devices span {slices} TPU slices, and data parallelism runs across them, so "
                     f"config.mesh.data={data} must be a multiple of {slices} (set --config.mesh.data={slices} or "
                     f"a multiple of it, and the other axes within one slice).")
  ici = tuple(s // slices if name == "data" else s for name, s in zip(MESH_AXES, shape))
  dcn = tuple(slices if name == "data" else 1 for name in MESH_AXES)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _rule_table(rules: Rules) -> dict[str, Any]:
  table = {}
  for name, axes in rules:
    table.setdefault(name, axes)  # first rule wins, like flax's logical_axis_rules
  return table


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """PartitionSpec of mesh axes for a tuple of logical axis names (None = replicated dimension)."""
  table = _rule_table(rules)
  used, spec = set(), []
  for name in logical_axes:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(
          f"sharding: no rule for logical axis {name!r} (axes {tuple(logical_axes)}). Add "
          f"('{name}', None) or a mesh axis to config.sharding.rules.")
    axes = table[name]
    axes_tuple = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    if used & set(axes_tuple):
      raise ValueError(
          f"sharding: logical axes {tuple(logical_axes)} map mesh axis {sorted(used & set(axes_tuple))} "
          f"twice. Fix config.sharding.rules so each mesh axis shards at most one dimension.")
    used |= set(axes_tuple)
    spec.append(axes if axes is None or isinstance(axes, str) else tuple(axes))
  return PartitionSpec(*spec)


def _check_divisible(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, what: str) -> None:
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    if dim % size:
      raise ValueError(
          f"sharding: {what} has shape {tuple(shape)} and spec {spec}; dimension {dim} is not divisible "
          f"by the {size} devices of mesh axes {axes}. Change config.mesh or map that logical axis to None "
          f"in config.sharding.rules.")


def named_sharding(mesh: Mesh, rules: Rules, logical_axes: Sequence[str | None],
                   shape: Sequence[int] | None = None, what: str = "array") -> NamedSharding:
  """NamedSharding for an array with these logical axes; checks divisibility when `shape` is given."""
  if shape is not None and len(shape) != len(logical_axes):
    raise ValueError(f"sharding: {what} has rank {len(shape)} but logical axes {tuple(logical_axes)}.")
  spec = logical_to_spec(logical_axes, rules)
  if shape is not None:
    _check_divisible(spec, shape, mesh, what)
  return NamedSharding(mesh, spec)


def tree_shardings(mesh: Mesh, rules: Rules, logical_tree: Any, shape_tree: Any) -> Any:
  """NamedShardings for a pytree, given its logical axes (tuples / PartitionSpecs) and its shapes."""
  paths_and_shapes = jax.tree_util.tree_flatten_with_path(shape_tree)[0]
  logical_leaves = jax.tree_util.tree_leaves(
      logical_tree, is_leaf=lambda x: isinstance(x, (tuple, PartitionSpec)))
  if len(logical_leaves) != len(paths_and_shapes):
    raise ValueError("sharding: the logical-axes tree does not match the array tree.")
  leaves = [
      named_sharding(mesh, rules, tuple(axes), leaf.shape, what=jax.tree_util.keystr(path))
      for axes, (path, leaf) in zip(logical_leaves, paths_and_shapes)
  ]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape_tree), leaves)


@dataclasses.dataclass(frozen=True)
class ShardingContext:
  """What the model needs to pin activation shardings: the mesh and the rules, passed explicitly."""
  mesh: Mesh
  rules: Rules

  def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    sharding = named_sharding(self.mesh, self.rules, logical_axes, x.shape, what="activation")
    return jax.lax.with_sharding_constraint(x, sharding)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], ctx: ShardingContext | None) -> jax.Array:
  """Pin `x` to its logical sharding; `ctx=None` means the caller runs the model unsharded on purpose."""
  return x if ctx is None else ctx.constrain(x, logical_axes)


def batch_shardings(mesh: Mesh, rules: Rules, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
  """Every batch field is sharded on its leading (pairs or rows) axis by the 'batch' rule."""
  return {
      k: named_sharding(mesh, rules, ("batch",) + (None,) * (np.ndim(v) - 1), np.shape(v), what=f"batch[{k!r}]")
      for k, v in batch.items()
  }


def batch_feed(mesh: Mesh, rules: Rules) -> tuple[int, int]:
  """(block, blocks): every global batch is cut into `blocks` equal, contiguous blocks of rows, and this process
  reads and feeds block `block`.

  One block per process when the batch axes (data, fsdp) span the processes. When another axis spans them (a
  'sequence' or 'tensor' axis across hosts), processes whose devices hold the same rows feed the same block: with
  mesh (data=1, sequence=8) over 2 hosts both feed the whole batch, and each device keeps its tokens of it.
  """
  spec = logical_to_spec(("batch",), rules)[0]
  axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
  shards = math.prod(mesh.shape[a] for a in axes)
  index_map = NamedSharding(mesh, PartitionSpec(spec)).devices_indices_map((shards,))
  mine = sorted({index_map[d][0].start or 0 for d in mesh.devices.flat if d.process_index == jax.process_index()})
  if not mine:
    return 0, 1
  per = len(mine)
  if mine != list(range(mine[0], mine[0] + per)) or mine[0] % per:
    raise ValueError(f"sharding: process {jax.process_index()}'s devices hold batch shards {mine} of {shards}, "
                     "not one contiguous block; order config.mesh so each host's devices hold neighbouring rows "
                     "(the batch axes data / fsdp outermost).")
  return mine[0] // per, shards // per


def global_batch(mesh: Mesh, rules: Rules, local_batch: Mapping[str, np.ndarray],
                 global_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, jax.Array]:
  """Assemble a global, sharded batch from this host's block of rows (`batch_feed`).

  On one process the local block is the whole batch. On a pod each host passes the rows it read; the global
  leading dimension is the local one times the number of blocks unless `global_shapes` says otherwise.
  """
  blocks = batch_feed(mesh, rules)[1] if jax.process_count() > 1 else 1
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    shape = tuple(global_shapes[k]) if global_shapes else (v.shape[0] * blocks,) + v.shape[1:]
    sharding = named_sharding(mesh, rules, ("batch",) + (None,) * (v.ndim - 1), shape, what=f"batch[{k!r}]")
    out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
  return out
