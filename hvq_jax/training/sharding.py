"""Device mesh and sharding rules: the same program from 1 CPU to a pod slice.

`config.mesh.axes` names the mesh axes (e.g. ('data', 'fsdp')) and `config.mesh.shape`
their sizes, one of which may be -1 for "all remaining devices". Batches are split over
every batch axis (`data` x `fsdp`); a parameter (and every optimiser-state leaf of the
same shape) is replicated, or, when it has at least `fsdp_min_size` elements and a
dimension divisible by the `fsdp` axis, split along its largest such dimension (ZeRO-3
style: XLA gathers it for the forward and reduce-scatters its gradient). No device
count is assumed anywhere: everything is derived from the mesh.
"""
from typing import Any, Sequence, Tuple

import numpy as np
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
  """A mesh config that does not fit the devices; the message names the field."""


def mesh_shape(shape: Sequence[int], n_devices: int) -> Tuple[int, ...]:
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise MeshError(f"config.mesh.shape={tuple(shape)}: sizes must be positive, at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if n_devices % known:
    raise MeshError(f"config.mesh.shape={tuple(shape)} does not divide {n_devices} devices")
  shape = [n_devices // known if s == -1 else s for s in shape]
  if int(np.prod(shape)) != n_devices:
    raise MeshError(f"config.mesh.shape={tuple(shape)} uses {int(np.prod(shape))} devices, "
                    f"but {n_devices} are visible (use -1 for 'the rest')")
  return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  axes = tuple(mesh_cfg.axes)
  if len(axes) != len(tuple(mesh_cfg.shape)):
    raise MeshError(f"config.mesh.axes={axes} and config.mesh.shape={tuple(mesh_cfg.shape)} "
                    "must have the same length")
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg.shape, len(devices))
  # Auto axes: shardings come from the rules below, XLA propagates the rest.
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def batch_axes(mesh: Mesh) -> Tuple[str, ...]:
  return tuple(a for a in mesh.axis_names if a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh) or None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def leaf_spec(shape: Tuple[int, ...], mesh: Mesh, fsdp_min_size: int) -> P:
  n = mesh.shape.get("fsdp", 1)
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < fsdp_min_size:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % n == 0:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree: Any, mesh: Mesh, fsdp_min_size: int) -> Any:
  """NamedSharding for every leaf of a (possibly abstract) pytree, by the rule above."""
  return jax.tree.map(lambda a: NamedSharding(mesh, leaf_spec(tuple(a.shape), mesh, fsdp_min_size)),
                      tree)


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's rows -> one global jax.Array sharded over the batch axes."""
  return jax.make_array_from_process_local_data(sharding, local)
