"""The only module that knows about devices, processes and how work is split over them.

Everything else is written for one device. Here a per-device function (with `axis_name='batch'`
collectives: `pmean`, `device_index`) runs on every device of every process as one compiled
program, `jax.jit` of `jax.shard_map` over a 1-D mesh of all devices. Arrays are global
`jax.Array`s: the train state is replicated with a sharding (`replicate`, no stacked host copies),
batches are split over the mesh along their batch axis, and results stay on the devices until
`gather` (or `to_host`) brings them back once.

Processes: `initialize_distributed` starts `jax.distributed` (CPU: gloo collectives), every
cross-process decision (stop now? NaN?) is made collectively (`any_process`), and only
`is_first_process()` writes files, except Orbax, which coordinates its own writes.

Why shard_map and not pmap: since JAX 0.8 `jax.pmap` is itself built on `jax.shard_map`, and JAX
recommends the latter. With shard_map under jit the state is one global array per leaf, so Orbax
saves it directly from several processes, a batch assembled from each process's slice is one array,
and the same code runs on one device, several devices and several hosts. The per-device code is the
pmap code unchanged: `check_vma=False` keeps pmap's semantics (no implicit sum of the gradients of
replicated parameters: the step averages them itself with `pmean`).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sgm_jax.errors import InputError

AXIS_NAME = "batch"
P = PartitionSpec


# --- processes -------------------------------------------------------------------------------

def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None, process_id: Optional[int] = None,
                           auto: bool = False) -> bool:
  """jax.distributed.initialize for a job of several processes; returns whether it ran.

  With `auto`, JAX detects what is not given from the cluster (TPU pods, SLURM, Open MPI,
  Kubernetes); otherwise nothing happens unless an argument is given. Must run before anything
  else touches JAX's devices. CPU devices use gloo for cross-process collectives.
  """
  if not auto and coordinator_address is None and num_processes is None and process_id is None:
    return False
  if num_processes is not None and num_processes < 1:
    raise InputError(f"--num_processes must be >= 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise InputError(f"--process_id must be in [0, {num_processes}), got {process_id}")
  if coordinator_address is not None and ":" not in coordinator_address:
    raise InputError(f"--coordinator_address must be HOST:PORT, got {coordinator_address!r}")
  # Only the CPU backend reads this; without it CPU processes cannot run collectives together.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("distributed: process %d of %d, %d local and %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def is_first_process() -> bool:
  """Whether this process writes the job's files (logs, plots, samples, config.json)."""
  return jax.process_index() == 0


def job_id() -> str:
  """Who holds a workdir, e.g. for its lock file: host, pid, and the job's process count."""
  host = os.uname().nodename
  return (f"pid {os.getpid()} on {host}" if jax.process_count() == 1 else
          f"pid {os.getpid()} on {host}, process 0 of a job of {jax.process_count()} processes")


def any_process(flag: bool) -> bool:
  """Whether `flag` is true in any process: one decision every process takes alike (a stop that
  only some processes take would leave the others waiting in a collective forever)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def sync_processes(name: str) -> None:
  """Wait until every process gets here; nothing to do for one process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# --- devices and placement ------------------------------------------------------------------

def local_device_count() -> int:
  return jax.local_device_count()


def device_count() -> int:
  """Devices of all processes."""
  return jax.device_count()


@functools.lru_cache(maxsize=None)
def _mesh(devices: tuple) -> Mesh:
  return Mesh(np.array(devices), (AXIS_NAME,))


def mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The 1-D mesh of every device (or of `devices`), process by process: process p's devices hold
  a contiguous block of each batch, the block its data pipeline loads."""
  devices = jax.devices() if devices is None else devices
  return _mesh(tuple(sorted(devices, key=lambda d: (d.process_index, d.id))))


def replicated() -> NamedSharding:
  return NamedSharding(mesh(), P())


def batch_sharded(axis: int = 0) -> NamedSharding:
  """Split along `axis` over all devices."""
  return NamedSharding(mesh(), P(*([None] * axis), AXIS_NAME))


_copy_on_devices = jax.jit(jnp.copy)


def replicate(tree: Any) -> Any:
  """The same value on every device as one global array per leaf (jax.device_put to a replicated
  sharding: one copy per device, no stacked host copies). Always new buffers, so donating the
  result leaves `tree` intact. Every process must pass the same values."""
  sharding = replicated()

  def one(x):
    if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() > 1:
      # device_put would send it to the other processes' devices (cross-host transfers); each
      # process places its own copy on its own devices instead.
      placed = jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    else:
      placed = jax.device_put(x, sharding)
    # device_put reuses x's own buffer as the copy on x's device (even with may_alias=False);
    # a copy made on the devices keeps x out of the donated state.
    return _copy_on_devices(placed) if isinstance(x, jax.Array) else placed
  return jax.tree_util.tree_map(one, tree)


def to_host(tree: Any) -> Any:
  """Host numpy copies of replicated arrays (their copy on this process's first device)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree_util.tree_map(one, tree)


unreplicate = to_host


def check_divisible(size: int, what: str) -> None:
  n = device_count()
  if size % n:
    raise InputError(f"{what}={size} must be divisible by the number of devices ({n})")


def padded_size(size: int) -> int:
  """`size` rounded up to a multiple of the number of devices."""
  n = device_count()
  return -(-size // n) * n


def from_process_batches(local: np.ndarray, axis: int = 0) -> jax.Array:
  """One global array from each process's block of a batch (process p holds the p-th block of
  size global / process_count along `axis`, as the data pipeline loads it), split over devices."""
  global_shape = list(local.shape)
  global_shape[axis] *= jax.process_count()
  return jax.make_array_from_process_local_data(batch_sharded(axis), local, tuple(global_shape))


def from_global_batch(x: np.ndarray, axis: int = 0) -> jax.Array:
  """A host array that every process holds whole, split over devices along `axis` (each process
  copies only its own devices' blocks)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, batch_sharded(axis), lambda index: x[index])


def gather(tree: Any) -> Any:
  """Host numpy copies of global arrays split over devices, whole on every process: one transfer
  for the whole tree (the results of many batches are best gathered together, once)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


# --- inside a per-device function --------------------------------------------------------------

def device_index() -> jax.Array:
  """Global index of the current device (0 .. device_count() - 1), inside `data_parallel` or
  `fused_steps`."""
  return jax.lax.axis_index(AXIS_NAME)


def pmean(tree: Any) -> Any:
  return jax.lax.pmean(tree, AXIS_NAME)


def global_example_index(local_batch: int) -> jax.Array:
  """Global index of each example of this device's batch (device-major), inside a per-device
  function."""
  return device_index() * local_batch + jnp.arange(local_batch)


# --- per-device functions run on every device ------------------------------------------------

def data_parallel(fn: Callable, in_specs: Sequence[Any], out_specs: Any,
                  donate_argnums: tuple = (),
                  devices: Optional[Sequence[jax.Device]] = None) -> Callable:
  """jit(shard_map(fn)) over every device of every process: one compiled program, each device
  running `fn` on its block. Specs say how each argument and output is laid out: `P()` the same
  on every device, `P(AXIS_NAME)` (or `batch_spec(axis)`) split along a batch axis. `fn` may use
  `device_index`, `global_example_index` and `pmean`; without collectives each device runs on its
  own (e.g. an adaptive solver with its own number of steps). `devices`: a subset to run on
  (benchmarks; the inputs must then be placed on its `mesh(devices)`)."""
  mapped = jax.shard_map(fn, mesh=mesh(devices), in_specs=tuple(in_specs), out_specs=out_specs,
                         check_vma=False)
  return jax.jit(mapped, donate_argnums=donate_argnums)


def batch_spec(axis: int = 0) -> PartitionSpec:
  return P(*([None] * axis), AXIS_NAME)


def map_batches(fn: Callable) -> Callable:
  """fn(shared, batch) -> outputs, for one device's block of `batch` (a pytree with a leading
  batch axis), run on all devices: returns g(shared, batch) with `shared` replicated and batch and
  outputs split along axis 0 over every device. The building block of data-parallel sampling and
  evaluation (place the inputs with `replicate` / `from_global_batch`, `gather` the outputs)."""
  return data_parallel(fn, (P(), P(AXIS_NAME)), P(AXIS_NAME))


def fused_steps(step_fn: Callable, donate_state: bool = True,
                devices: Optional[Sequence[jax.Device]] = None) -> Callable:
  """n training steps on every device in one call: f(state, batches) -> (state, metrics).

  `state` is replicated (`replicate`), `batches` is a global (n_steps, global_batch, ...) array
  split over devices along axis 1 (`from_process_batches(local, axis=1)`); each device sees
  (n_steps, per_device_batch, ...). step_fn(state, batch) -> (state, metrics) runs on one device
  and may use `pmean` and `global_example_index`; the state and metrics it returns must be the same
  on every device (averaged with `pmean`). The n steps are unrolled into straight-line code rather
  than a lax.scan: XLA's CPU backend runs gradients of convolutions several times slower inside a
  loop (measured 6x for the Fashion-MNIST U-Net), while on accelerators both are fast. The state
  is donated, so training keeps one copy on each device.
  """
  def run(state, batches):
    metrics = []
    for i in range(batches.shape[0]):
      state, m = step_fn(state, batches[i])
      metrics.append(m)
    return state, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *metrics)

  return data_parallel(run, (P(), batch_spec(1)), (P(), P()),
                       donate_argnums=(0,) if donate_state else (), devices=devices)


def every_process(flags: Any) -> np.ndarray:
  """Elementwise: whether each of `flags` (a bool array of one shape in every process) is true in
  every process: a set all processes agree on, e.g. the finished batches of a resumed evaluation
  that each of them could read."""
  flags = np.asarray(flags, bool)
  if jax.process_count() == 1:
    return flags
  from jax.experimental import multihost_utils
  return np.all(multihost_utils.process_allgather(flags.astype(np.uint8)), axis=0).astype(bool)
