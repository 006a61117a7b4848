"""Device mesh, shardings of the batch and of the train state, and global batch assembly.

One mesh over every device of every process, with two axes:

  'data'  the batch is split over it (data parallelism: params replicated across it);
  'fsdp'  the batch is split over it too, and big parameters / optimizer moments are split over
          it along one of their dims (fully sharded data parallelism). Size 1 = plain DP.

The axes are ``AxisType.Auto``: with Explicit axes (``jax.make_mesh``'s default now) Swin's
window reshapes fail with a ``ShardingTypeError``; with Auto axes XLA's partitioner propagates
the batch sharding through the reshapes by itself.

BatchNorm under this mesh normalizes with the statistics of the *global* batch (XLA inserts the
cross-device reductions), so a step on N devices computes what one device computes on the same
global batch; the official code (DDP without SyncBN) uses per-GPU statistics instead.
"""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from birefnet_jax.errors import UserError

BATCH_AXES = ('data', 'fsdp')


class BatchSizeError(UserError, ValueError):
  """A batch size that does not split over the devices (a user error: one line)."""


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices (of all processes); ``fsdp`` devices per group."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise BatchSizeError(f'config.fsdp={fsdp} must be >= 1 and divide the device count {n}',
                         f'set --config.fsdp to a divisor of {n}')
  return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device, the other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size: int, min_size: int = 2**18) -> P:
  """The partition spec of one parameter-like array under the simple FSDP rule.

  Arrays with fewer than ``min_size`` elements stay replicated (splitting them saves little
  memory and costs a collective each); bigger ones are split over 'fsdp' along their largest
  dimension divisible by the axis size (ties: the last such dim, i.e. output channels of a conv
  or Dense kernel). Nothing divisible: replicated.
  """
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return P(*spec)


def state_shardings(mesh: Mesh, abstract_state, min_size: int = 2**18):
  """NamedShardings for a pytree of (abstract) arrays: replicated, or FSDP-split when the mesh's
  'fsdp' axis is larger than 1. Scalars (step counters) are always replicated."""
  fsdp_size = mesh.shape['fsdp']

  def one(x):
    shape = getattr(x, 'shape', ())
    return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, min_size))

  return jax.tree.map(one, abstract_state)


def local_batch_size(global_batch_size: int) -> int:
  """This process's share of the global batch (checks that it splits evenly over devices)."""
  devices, processes = jax.device_count(), jax.process_count()
  if global_batch_size < 1 or global_batch_size % devices:
    raise BatchSizeError(
        f'the global batch size {global_batch_size} must be a positive multiple of the number '
        f'of devices ({devices})',
        f'set --config.batch_size to a multiple of {devices}, or --config.batch_size=-1 and '
        '--config.batch_size_per_device=N (the global batch is then N per device)')
  return global_batch_size // processes


def global_batch(local_batch, sharding: NamedSharding):
  """A pytree of process-local numpy arrays -> global jax Arrays split by ``sharding``.

  Each process passes its own rows (``local_batch_size`` of them); the global batch is their
  concatenation in process order.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def put_replicated(tree, mesh: Mesh):
  """Host values -> arrays replicated on every device of the mesh (same value on every process)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), sharding), tree)


_BARRIERS = {'count': 0}


def compile_everywhere(jitted, *args, timeout_s: int = 3600):
  """Multi-process runs: compiles ``jitted`` for ``args``, then waits until all processes have.

  Without it a process that loads the program from the persistent compilation cache (only
  process 0 writes there, keys differ per process) runs ahead into the program's first
  collective and waits there while the others compile; CPU collectives (gloo) give up after
  30 s. The compiled program stays cached: calling ``jitted`` with such args does not compile
  again. A no-op for a single process.

  The barrier is the distributed runtime's (jax.distributed's coordination service, through
  orbax's public ``multihost.get_barrier_sync_fn``), not a device collective: jax's
  ``multihost_utils.sync_global_devices`` is an all-gather over the devices, a collective
  like the one above (not measured here). Checked by hand: a process that starts 40 s late
  passes it.
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  jitted.lower(*args).compile()
  _BARRIERS['count'] += 1   # every process calls this in the same order: same barrier names
  multihost.get_barrier_sync_fn()(key=f'birefnet_compiled_{_BARRIERS["count"]}',
                                  timeout_ms=timeout_s * 1000)
