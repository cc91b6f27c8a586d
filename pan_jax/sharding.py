"""Device mesh and shardings for data-parallel training and evaluation.

One mesh axis, 'data', spans every device of every process. Parameters,
batch statistics and optimiser state are replicated (PAN fits on one device,
so FSDP stays out); batches are split along their leading axis. Under
`jax.jit` with these shardings XLA inserts the gradient all-reduce, and
BatchNorm statistics are means over the global batch (synchronised BN).
"""

from typing import Any, Optional, Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from pan_jax import errors

DATA_AXIS = 'data'


def make_mesh(devices: Optional[Sequence[jax.Device]] = None
              ) -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all devices).

  Args:
    devices: devices to use, all of them (of every process) by default. Tests
      pass a subset to compare device counts in one process.

  Returns:
    A jax.sharding.Mesh whose axis type is Auto (shardings are given to
    jax.jit explicitly rather than carried in array types).
  """
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of a value held whole on every device (params, scalars)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of a batch split along its leading axis over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh,
                     field: str = 'global_batch_size') -> None:
  """Raises ValueError unless `batch_size` splits evenly over the mesh.

  Args:
    batch_size: the global batch size.
    mesh: the mesh it is sharded over.
    field: the config field named in the message.
  """
  devices = mesh.devices.size
  processes = jax.process_count()
  if batch_size <= 0 or batch_size % devices:
    nearest = max(devices, batch_size // devices * devices)
    raise errors.ConfigError(
        f'config.{field}={batch_size} must be a positive multiple of the '
        f'number of devices ({devices} over {processes} process(es)); '
        f'for example --config.{field}={nearest}.')
  if batch_size % processes:
    raise errors.ConfigError(
        f'config.{field}={batch_size} must be a multiple of the process '
        f'count ({processes}).')


def to_global(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Makes global arrays sharded over 'data' from this process's batch.

  Every process passes its own slice of the global batch (leading axis
  global_batch / process_count); the result is one jax.Array per leaf whose
  leading axis is the global batch.

  Args:
    batch: a tree of NumPy arrays, this process's part of the batch.
    mesh: the mesh to shard over.

  Returns:
    The same tree of global jax.Arrays.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
