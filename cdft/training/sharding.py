"""Data-parallel sharding over a device mesh (single- and multi-host).

The mesh comes from the config as ``((axis_name, size), ...)``; a size of -1
takes all remaining devices. Parameters and optimizer state are replicated; the
batch is split along its leading axis over the ``'data'`` axis. Each process
feeds only its own part of the global batch
(:func:`global_batch`), so the same code runs on one CPU with 8 fake devices and
on a multi-host GPU/TPU pod.
"""
import collections
import math
import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cdft.errors import CdftError

DATA_AXIS = "data"


def make_mesh(axes, devices=None):
  """A mesh from ``((name, size), ...)``; one size may be -1 (all remaining devices).

  In a single process, sizes that multiply to fewer devices than there are take
  the first ones (``(('data', 1),)``: one device of a host that has several);
  several processes must use every device.

  Raises:
    CdftError: sizes that do not fit the device count, or no 'data' axis.
  """
  devices = jax.devices() if devices is None else devices
  names = tuple(str(name) for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  if DATA_AXIS not in names:
    raise CdftError(f"config.mesh needs a {DATA_AXIS!r} axis, got {names}")
  if sizes.count(-1) > 1:
    raise CdftError(f"config.mesh: at most one axis may be -1, got {tuple(axes)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise CdftError(f"config.mesh {tuple(axes)}: {len(devices)} devices are not divisible "
                      f"by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) < len(devices) and jax.process_count() == 1:
    devices = devices[:math.prod(sizes)]
  if math.prod(sizes) != len(devices):
    raise CdftError(f"config.mesh {tuple(axes)} needs {math.prod(sizes)} devices, "
                    f"{len(devices)} are available")
  return jax.make_mesh(tuple(sizes), names, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def replicated(mesh):
  """Sharding of parameters and optimizer state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """Sharding of a batch: leading axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def data_size(mesh):
  """Number of data-parallel shards (devices along the 'data' axis)."""
  return mesh.shape[DATA_AXIS]


def check_batch_size(global_batch_size, mesh):
  """Raises a clear error when the batch cannot be split evenly over devices and hosts."""
  n = data_size(mesh)
  if global_batch_size % n:
    raise CdftError(f"batch_size {global_batch_size} is not divisible by the {n} devices "
                    "of the data axis")
  if global_batch_size % jax.process_count():
    raise CdftError(f"batch_size {global_batch_size} is not divisible by the "
                    f"{jax.process_count()} processes")


def global_batch(local_batch, mesh):
  """Assembles this process's part of the batch (numpy dict) into global jax Arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def prefetch_to_mesh(local_batches, mesh, size=2):
  """Yields ``global_batch(b, mesh)`` of each batch of ``local_batches``, keeping ``size``
  of them already placed (the transfers are asynchronous: the next batches go to the
  devices while the step runs). ``size`` 0 places each batch when it is asked for."""
  queue = collections.deque()
  for local in local_batches:
    queue.append(global_batch(local, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


# Most CPU devices split_cpu_host makes of one process's cores. Measured with
# launch/bench_train.py on a 2-core AVX-512 VM at 4 / 8 / 16 devices: FT teacher
# 50.9 / 64.2 / 67.3 img/s, FT student 149 / 156 / 143, CD step 2 (k=3) 0.79 at 8.
CPU_DEVICES_MAX = 8


def _onednn_convolutions(config):
  """Whether ``config.cpu_conv`` will put the convolutions on oneDNN here (its files and a
  compiler are found; a build that then fails falls back to XLA with a warning)."""
  from cdft.kernels import build  # pylint: disable=import-outside-toplevel
  if config.get("cpu_conv", "xla") == "xla":
    return False
  try:
    build.find_onednn()
    build.find_compiler()
  except build.KernelUnavailable:
    return False
  return True


def split_cpu_host(config, process_count=1):
  """Runs the data-parallel step of a CPU-only host on several CPU devices of this process.

  One XLA:CPU device runs a step on the whole batch; the same step split over
  several devices of the same cores runs each part with its activations in
  cache, and is faster (FT teacher, batch 128, 2 cores: 1 device 38.5 img/s,
  8 devices 64 img/s; ``launch/bench_train.py``). The result is the same
  training step: the batch is sharded, BatchNorm and the loss reduce over
  the global batch. Must run before JAX starts its backends; a GPU or TPU
  host is not affected (only the CPU backend is split).

  With oneDNN's convolutions (``config.cpu_conv``, :mod:`cdft.kernels`) the
  automatic choice is one device: oneDNN runs each convolution on all the
  cores, and the FT teacher's step was slower split (1 / 2 / 8 devices:
  1.07 / 1.14 / 1.50 s).

  Args:
    config: the run's config: ``config.cpu_devices`` (-1: automatic, the
      largest divisor of the per-process batch and eval batch up to
      :data:`CPU_DEVICES_MAX`, or one device with oneDNN convolutions; 0 or 1:
      one device; n: n devices).
    process_count: processes of the run (each splits its own cores).

  Returns:
    The number of CPU devices set, or None when left alone: the user chose
    (``XLA_FLAGS`` with ``--xla_force_host_platform_device_count``, or
    ``jax_num_cpu_devices`` already set) or the backends already run.
  """
  wanted = int(config.get("cpu_devices", -1))
  if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
      or jax.config.jax_num_cpu_devices != -1):
    return None
  if wanted in (0, 1) or (wanted == -1 and _onednn_convolutions(config)):
    return None
  local = config.batch_size // max(process_count, 1)
  evals = (config.get("eval_batch_size") or config.batch_size) // max(process_count, 1)
  if wanted > 1:
    if local % wanted or evals % wanted:
      raise CdftError(f"config.cpu_devices={wanted} does not divide the per-process batch "
                      f"{local} (and eval batch {evals})")
    count = wanted
  else:
    count = max(n for n in range(1, CPU_DEVICES_MAX + 1) if local % n == 0 and evals % n == 0)
  if count == 1:
    return None
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backends already run
    return None
  return count
