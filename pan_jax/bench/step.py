"""One train-step or inference measurement of a configured network.

Run by `python -m pan_jax.bench train|infer` in a fresh subprocess per
measurement (harness.py). It times what users run: `train.train_step`
(forward, pixel cross-entropy ignoring 255, backward, SGD with momentum and
weight decay, BatchNorm statistics update; state donated) and the jitted
eval-mode forward, on random data of the requested size, blocking on every
iteration.
"""

import functools
import os
import resource
import statistics
import time

from typing import Any, Dict

import jax
import ml_collections

from pan_jax import models
from pan_jax import optim
from pan_jax import runtime
from pan_jax import train

MODES = ('train', 'infer')


def _flops(compiled) -> float:
  try:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0]
    return float(analysis.get('flops', float('nan')))
  except Exception:  # pylint: disable=broad-except
    return float('nan')  # not every backend reports a cost analysis


def _memory_mib(compiled) -> dict:
  """XLA's buffer plan for the program: what one step holds, compile excluded.

  argument (state and batch in), output (not aliased to a donated argument)
  and temp (activations and scratch), in MiB; {} where the backend does not
  report them.
  """
  try:
    stats = compiled.memory_analysis()
    sizes = {'argument': stats.argument_size_in_bytes,
             'output': stats.output_size_in_bytes - stats.alias_size_in_bytes,
             'temp': stats.temp_size_in_bytes}
  except Exception:  # pylint: disable=broad-except
    return {}
  return {f'xla_{name}_mib': value / 2**20 for name, value in sizes.items()}


def _device_memory_mib() -> dict:
  """The device's peak memory in use (GPU/TPU), {} where not reported (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return {}
  if not stats or 'peak_bytes_in_use' not in stats:
    return {}
  return {'peak_device_mib': stats['peak_bytes_in_use'] / 2**20}


# An iteration counts as quiet when the rest of the machine used at most
# this many cores meanwhile (the peer's bench_smp.py uses the same bound).
QUIET_CORES = 0.15


def _machine_busy_s() -> float:
  """CPU-seconds the whole machine has been busy (Linux /proc/stat; NaN)."""
  try:
    with open('/proc/stat') as f:
      ticks = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return float('nan')
  idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
  return (sum(ticks[:8]) - idle) / os.sysconf('SC_CLK_TCK')


def _reset_peak_rss() -> bool:
  """Restarts the count of this process's peak RSS (Linux); False elsewhere."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def _peak_rss_mib() -> float:
  """This process's peak RSS (since `_reset_peak_rss`, where it ran)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(config: ml_collections.ConfigDict, mode: str, *,
            config_name: str, batch: int, size: int, classes: int,
            dtype: str, warmup: int, iters: int) -> Dict[str, Any]:
  """Measures one mode of a network in this process.

  Args:
    config: the network's config (not modified).
    mode: 'train' (train_step) or 'infer' (eval-mode forward).
    config_name: the config's `path[:arg]`, for the record.
    batch: images per step.
    size: image side (square images, and config.data.crop_size).
    classes: number of classes.
    dtype: compute dtype, 'float32' or 'bfloat16'.
    warmup: untimed steps after the compiling one.
    iters: timed steps.

  Returns:
    A JSON-able record: mode, config, batch, size, classes, dtype, backend,
    devices, device_kind, times_s, median_s, min_s, images_per_s, compile_s,
    cpu_s and median_cpu_s (this process's CPU-seconds per step: on a
    shared machine they move far less than the time), other_cores (cores
    the rest of the machine used during each step) and median_quiet_s (the
    median over steps where that was at most QUIET_CORES; None if none),
    gflop_per_step, achieved_tflops, peak_rss_mib (infer: counted from the
    weights in memory on, where Linux lets the count restart; peak_rss_from
    says which), xla_{argument,output,temp}_mib (where the backend reports
    them), peak_device_mib (the accelerator's peak bytes in use, where
    reported), jax.
  """
  if mode not in MODES:
    raise ValueError(f'mode {mode!r}: expected one of {MODES}')
  config = config.copy_and_resolve_references()
  config.compute_dtype = dtype
  config.data.crop_size = size
  config.global_batch_size = batch
  model = models.create_model(config, classes)
  rng = jax.random.key(0)
  images = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
  labels = jax.random.randint(jax.random.key(2), (batch, size, size),
                              0, classes)
  tx = optim.create_optimizer(config)
  init_fn = jax.jit(functools.partial(train.create_train_state,
                                      config=config, model=model, tx=tx))
  state = init_fn(rng)

  peak_from_here = False
  start = time.perf_counter()
  if mode == 'train':
    # As the training loop compiles it (the init program dropped, the
    # compiler's freed memory given back before the first step).
    compiled = train.compile_train_step(
        jax.jit(train.train_step, donate_argnames=('state',)), state,
        {'image': images, 'label': labels}, init_fn)
    holder = [state]

    def step():
      holder[0], metrics = compiled(holder[0], {'image': images,
                                                'label': labels})
      jax.block_until_ready(metrics['loss'])
  else:
    variables = jax.block_until_ready(
        {'params': state.params, 'batch_stats': state.batch_stats})
    del state
    # An inference process (evaluate, predict) reads its weights from a
    # checkpoint: it never compiles an init program, whose compilation
    # here (~1.2 GiB at R101) is not part of what is measured. So the init
    # is dropped, its memory given back, and the peak counted from here.
    init_fn.clear_cache()
    runtime.release_free_memory()
    peak_from_here = _reset_peak_rss()
    compiled = runtime.compile_then_release(
        jax.jit(functools.partial(model.apply, train=False)), variables,
        images)

    def step():
      jax.block_until_ready(compiled(variables, images))
  compile_s = time.perf_counter() - start

  for _ in range(warmup):
    step()
  times, cpu = [], []
  other_cores = []  # Cores the rest of the machine used meanwhile.
  for _ in range(iters):
    busy0, c0, t0 = _machine_busy_s(), time.process_time(), time.perf_counter()
    step()
    t1, c1, busy1 = time.perf_counter(), time.process_time(), _machine_busy_s()
    times.append(t1 - t0)
    cpu.append(c1 - c0)
    other_cores.append(max(0., (busy1 - busy0) - (c1 - c0)) / (t1 - t0))
  median = statistics.median(times)
  quiet = [t for t, o in zip(times, other_cores) if o <= QUIET_CORES]
  flops = _flops(compiled)
  return {
      'mode': mode, 'config': config_name, 'batch': batch, 'size': size,
      'classes': classes, 'dtype': dtype,
      'backend': jax.default_backend(), 'devices': jax.device_count(),
      'device_kind': jax.devices()[0].device_kind,
      'times_s': [round(t, 4) for t in times], 'median_s': median,
      'cpu_s': [round(c, 4) for c in cpu],
      'median_cpu_s': statistics.median(cpu),
      'other_cores': [round(o, 2) for o in other_cores],
      'median_quiet_s': statistics.median(quiet) if quiet else None,
      'min_s': min(times), 'images_per_s': batch / median,
      'compile_s': compile_s, 'gflop_per_step': flops / 1e9,
      'achieved_tflops': flops / median / 1e12,
      'peak_rss_mib': _peak_rss_mib(),
      'peak_rss_from': ('weights in memory' if peak_from_here
                        else 'process start'),
      **_memory_mib(compiled), **_device_memory_mib(),
      'jax': jax.__version__,
  }
