"""Start-up of every command: XLA CPU flags, jax.distributed, logging.

Every `python -m pan_jax.<command>` ends in `runtime.run(main)`, which parses
the absl flags and calls `start()` before `main`, so a training, evaluation,
export or benchmark process starts the same way on one CPU, a GPU host or
every host of a TPU pod slice:

* CPU: unless the user set XLA CPU options, XLA_FLAGS gets the options that
  make ResNet training ~4x faster on XLA's CPU backend (measured on this
  project's 2-core machine, side by side with PyTorch): without multi-output
  fusion XLA recomputes residual blocks for the weight gradients, and
  jaxlib 0.10's YNN convolutions are slow for training (YNN stays on for
  reductions). XLA reads XLA_FLAGS when its first backend starts, not when
  jax is imported, so setting it here, before any computation, is in time.
  glibc's huge pages (GLIBC_TUNABLES, read when a process starts) remove the
  page faults of fresh multi-GB buffers every step; they only help when in
  the environment of the command (launch scripts and the bench set CPU_ENV).
* Multi-host: with PAN_JAX_DISTRIBUTED=1 (set by launch/*.sh),
  `jax.distributed.initialize()` is called first. Cluster environments (TPU
  VMs, SLURM, MPI) configure themselves; elsewhere set
  JAX_COORDINATOR_ADDRESS, PAN_JAX_NUM_PROCESSES and PAN_JAX_PROCESS_ID on
  every process. It is never called otherwise: it fails on a single host
  that is not a TPU.
* Random bits do not depend on how arrays are sharded
  (`jax_threefry_partitionable`), so initialisation is the same on 1 device
  or 256.
* Logging: Orbax logs every step of every save and restore at INFO; only its
  warnings are kept.
"""

import importlib.util
import logging as py_logging
import os
from typing import Any, Callable, Sequence

from absl import app
from absl import logging
import jax

CPU_XLA_FLAGS = ('--xla_backend_extra_options=xla_cpu_use_multi_output_fusion'
                 ' --xla_cpu_experimental_ynn_fusion_type=reduce')
# The environment of a CPU process started by another (bench, launch scripts).
CPU_ENV = {'XLA_FLAGS': CPU_XLA_FLAGS,
           'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
# jax plugins whose presence means jax will not run on the CPU.
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin',
                        'jax_rocm7_plugin', 'libtpu')


def on_cpu() -> bool:
  """Whether jax will run on the CPU (decided without starting a backend)."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms == 'cpu'
  return not any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


def set_cpu_flags() -> None:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS unless the user chose XLA CPU options.

  Call before jax's first computation (jax may already be imported).
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_' in flags or 'xla_backend_extra_options' in flags:
    return  # The user chose; respect it.
  os.environ['XLA_FLAGS'] = (flags + ' ' + CPU_XLA_FLAGS).strip()


def _not_orbax_info(record: py_logging.LogRecord) -> bool:
  return record.levelno >= py_logging.WARNING or '/orbax/' not in (
      record.pathname)


def start() -> None:
  """Prepares this process for jax; `run` calls it before every command."""
  if on_cpu():
    set_cpu_flags()
  logging.get_absl_logger().addFilter(_not_orbax_info)
  if os.environ.get('PAN_JAX_DISTRIBUTED') == '1':
    env = {k: int(os.environ[v]) for k, v in (
        ('num_processes', 'PAN_JAX_NUM_PROCESSES'),
        ('process_id', 'PAN_JAX_PROCESS_ID')) if v in os.environ}
    jax.distributed.initialize(**env)
  jax.config.update('jax_threefry_partitionable', True)
  logging.info('process %d/%d, %d local / %d global devices (%s); XLA_FLAGS=%r',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend(), os.environ.get('XLA_FLAGS', ''))


def run(main: Callable[[Sequence[str]], Any]) -> None:
  """Runs a command: parses flags (absl), `start()`, then `main(argv)`.

  Args:
    main: the command's main(argv); its return value is the exit status.
  """
  def start_then_main(argv):
    start()
    return main(argv)
  app.run(start_then_main)
