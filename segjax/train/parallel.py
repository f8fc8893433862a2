"""Devices, shardings, and compiling the step functions with jit or pmap.

`jit` (default): one global program over a `Mesh` with a "data" axis. Batches
are global `jax.Array`s sharded on "data" (each host contributes its
per-host slice through `jax.make_array_from_process_local_data`); the state is
replicated. XLA inserts the gradient all-reduce, and BatchNorm statistics are
global (synchronised) for free.

`pmap`: the same step functions under `jax.pmap`; the state is replicated
per local device, each local device gets a slice of the host's batch, and the
steps reduce across devices with `psum` over `PMAP_AXIS`, which the models'
BatchNorm layers also receive.
"""
import functools
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PMAP_AXIS = "batch"


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Joins a multi-host run; a no-op for a single process.

  With explicit arguments (e.g. several CPU/GPU hosts) they are passed to
  `jax.distributed.initialize`; without, JAX auto-detects TPU pods, SLURM and
  other cluster environments. CPU runs use gloo collectives.
  """
  if coordinator_address is None and num_processes is None:
    if not _cluster_detected():
      return
    jax.distributed.initialize()
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def _cluster_detected():
  import os
  markers = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
             "JAX_COORDINATOR_ADDRESS", "TPU_ACCELERATOR_TYPE")
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) < 2:
    return False
  return any(os.environ.get(m) for m in markers)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: all devices)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


class Parallel:
  """Places state and batches and compiles steps for one parallel mode.

  Args:
    mode: "jit" or "pmap".
    mesh: the device mesh (jit) — its devices are also the ones pmap uses.
  """

  def __init__(self, mode: str, mesh: Mesh):
    self.mode = mode
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, P())
    self.data_sharding = NamedSharding(mesh, P("data"))
    self.local_devices = [d for d in mesh.devices.flat
                          if d.process_index == jax.process_index()]

  @property
  def axis_name(self) -> Optional[str]:
    """Axis name for BatchNorm and the steps' psums (None under jit)."""
    return PMAP_AXIS if self.mode == "pmap" else None

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  # --- placement ---------------------------------------------------------
  def put_state(self, tree: Any) -> Any:
    """Replicates a host pytree (same values on every process)."""
    if self.mode == "pmap":
      # One stacked copy per local device; pmap shards the leading axis.
      n = len(self.local_devices)
      return jax.tree_util.tree_map(
          lambda x: np.repeat(np.asarray(x)[None], n, axis=0), tree)
    return jax.device_put(tree, self.replicated)

  def host_state(self, tree: Any) -> Any:
    """The single (unreplicated) copy of the state to save or inspect."""
    if self.mode == "pmap":
      return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), tree)
    return tree

  def local_variables(self, state: Any) -> Dict[str, Any]:
    """The model variables {"params", "batch_stats"} of a device TrainState,
    one copy on this process's devices (for per-device evaluation)."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if self.mode == "pmap":
      return self.host_state(variables)
    if jax.process_count() == 1:  # Already replicated on this host's devices.
      return variables
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0), variables)

  def put_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Host-local numpy batch dict -> device arrays for the compiled step."""
    if self.mode == "pmap":
      n = len(self.local_devices)
      return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(self.data_sharding, v)
            for k, v in batch.items()}

  def put_replicated(self, value: Any) -> Any:
    """A small array (PRNG key, confusion matrix) on every device."""
    return self.put_state(value)

  def fetch(self, tree: Any) -> Any:
    """Replicated device values -> host numpy (first replica under pmap)."""
    if self.mode == "pmap":
      return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x[0])), tree)
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)

  def gather(self, tree: Any) -> Any:
    """Per-example outputs of a compiled step -> host numpy of the global batch.

    Under jit the step's outputs are replicated global arrays; under pmap
    each process holds its devices' [n, b, ...] and gathers the others'.
    """
    if self.mode == "jit":
      return self.fetch(tree)
    local = jax.tree_util.tree_map(
        lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), tree)
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(
        local, tiled=True))

  # --- compilation -------------------------------------------------------
  def compile(self, step_fn: Callable, donate_first: bool = False,
              compiler_options: Optional[Dict[str, Any]] = None, **static) -> Callable:
    """Compiles `step_fn(first, batch, other, **static)`.

    `first` and `other` are replicated (state, rng or confusion matrix) and
    `batch` is sharded; outputs are replicated. `compiler_options` (XLA
    debug options, e.g. segjax.models.remat.KEEP_REMAT) apply under jit;
    jax.pmap takes none, so under pmap they are left out.
    """
    donate = (0,) if donate_first else ()
    if self.mode == "pmap":
      fn = functools.partial(step_fn, axis_name=PMAP_AXIS, **static)
      # pmap's default device set spans every process, so its psums are
      # global; name the devices only when the mesh is a single-host subset.
      subset = (jax.process_count() == 1 and
                len(self.local_devices) < jax.local_device_count())
      return jax.pmap(fn, axis_name=PMAP_AXIS, donate_argnums=donate,
                      devices=self.local_devices if subset else None)
    fn = functools.partial(step_fn, **static)
    return jax.jit(fn, donate_argnums=donate, out_shardings=self.replicated,
                   compiler_options=compiler_options)
