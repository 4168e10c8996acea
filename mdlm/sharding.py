"""Device mesh, logical-axis rules and multi-host start-up.

Parameters carry logical axis names (see mdlm.models.transformer); a rules table (config
`mesh.rules`) maps each logical name to mesh axes of the (data, fsdp, tensor) mesh. The same code
runs on one CPU (a 1x1x1 mesh), 8 GPUs or a TPU pod: only the mesh sizes change.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
log = logging.getLogger(__name__)


def maybe_initialize_distributed() -> None:
  """Calls jax.distributed.initialize() when launched as several processes.

  Recognised launches: an explicit coordinator (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID), SLURM with more than one task, or a multi-host TPU slice (auto-detected by JAX).
  """
  if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
    return
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env:
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
        process_id=int(env.get("JAX_PROCESS_ID", "0")))
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("MDLM_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int | None = None) -> tuple:
  n = jax.device_count() if num_devices is None else num_devices
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {sizes}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise ValueError(f"{n} devices cannot be split into a mesh with fixed axes {sizes}.")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(
        f"Mesh (data, fsdp, tensor)={tuple(sizes)} needs {int(np.prod(sizes))} devices but {n} are "
        "available; set mesh.data/mesh.fsdp/mesh.tensor so their product equals the device count "
        "(one of them may be -1).")
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all), laid out on the physical
  topology by jax's mesh_utils. Devices of several TPU slices (multi-slice) put the slices on the
  data axis, so only data parallelism crosses the slower data-center network."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:
    if shape[0] % slices:
      raise ValueError(
          f"The devices span {slices} slices, and the data axis spans the slices: mesh.data="
          f"{shape[0]} must be a multiple of {slices} (fsdp and tensor stay within a slice).")
    grid = mesh_utils.create_hybrid_device_mesh(
        (shape[0] // slices,) + shape[1:], (slices, 1, 1), devices,
        allow_split_physical_axes=True)
  else:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  # Auto axes: XLA's sharding propagation places the activations; parameters and batches carry
  # explicit NamedShardings from the rules table.
  return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def rules_dict(rules: Sequence[Sequence[Any]]) -> dict[str, Any]:
  out = {}
  for name, target in rules:
    if isinstance(target, (list, tuple)):
      target = tuple(target)
      bad = [t for t in target if t not in AXES]
    else:
      bad = [] if target is None or target in AXES else [target]
    if bad:
      raise ValueError(f"mesh.rules maps {name!r} to unknown mesh axes {bad}; use {AXES} or null.")
    out[name] = target
  return out


def logical_to_spec(logical: Sequence[str | None], rules: dict[str, Any], mesh: Mesh,
                    shape: Sequence[int] | None = None) -> P:
  """Maps logical axis names to a PartitionSpec. A mesh axis is used at most once; axes of size 1
  are dropped (a 1-device mesh gives a fully replicated spec); with `shape`, a dimension that the
  mesh axes do not divide (e.g. a 50,257-token vocabulary) stays replicated."""
  used, out = set(), []
  for i, name in enumerate(logical):
    target = rules.get(name) if name is not None else None
    targets = target if isinstance(target, tuple) else (target,) if target else ()
    targets = tuple(a for a in targets if a not in used and mesh.shape[a] > 1)
    if shape is not None and targets and shape[i] % int(np.prod([mesh.shape[a] for a in targets])):
      targets = ()
    used.update(targets)
    out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return P(*out)


def tree_shardings(logical_specs, rules: dict[str, Any], mesh: Mesh, shapes=None):
  """Maps a pytree of logical PartitionSpecs (nnx.get_partition_spec) to NamedShardings; `shapes`
  (a matching pytree of arrays or ShapeDtypeStructs) enables the divisibility check."""
  is_spec = lambda x: isinstance(x, P)
  if shapes is None:
    return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), rules, mesh)),
                        logical_specs, is_leaf=is_spec)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_spec(tuple(spec), rules, mesh, x.shape)),
      logical_specs, shapes, is_leaf=is_spec)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
  if axes is not None and len(axes) == 1:
    axes = axes[0]
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into globally sharded arrays."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items()}


# The mesh whose batch axes shard the activations of the step being traced (see
# `activation_sharding`); None: leave the activations to XLA's sharding propagation.
_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("mdlm_activation_mesh",
                                                                  default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
  """While a step is traced under this context, `constrain_batch` pins the model's activations to
  the batch sharding. Without it XLA's propagation may follow the parameters' fsdp sharding of
  the embedding axis instead of the batch's, and hold whole-batch activations on every device
  (on an fsdp mesh several times the memory of the same step on a data mesh)."""
  token = _ACTIVATION_MESH.set(mesh)
  try:
    yield
  finally:
    _ACTIVATION_MESH.reset(token)


def constrain_batch(x):
  """x with its leading (batch) axis sharded over the batch mesh axes and the rest replicated,
  inside `activation_sharding`; x unchanged outside it or when the batch does not divide."""
  mesh = _ACTIVATION_MESH.get()
  if mesh is None or batch_divisor(mesh) == 1 or x.shape[0] % batch_divisor(mesh):
    return x
  return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))
