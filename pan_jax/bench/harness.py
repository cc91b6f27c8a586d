"""Measurement subprocesses and side-by-side rounds with the PyTorch peer.

Every measurement runs in a fresh process (compile caches, allocator state
and peak RSS belong to it alone) and hands back one JSON record through a
temporary `--json` file. `side_by_side` alternates pan_jax with the peer
(segmentation_models_pytorch's PAN, PEER_DIR/bench_smp.py) round by round
and prints the time ratio pan_jax/smp of each round and its median.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

from pan_jax import runtime

PEER_SCRIPT = 'bench_smp.py'
# One XLA CPU option at XLA's own default. runtime.start() keeps XLA_FLAGS
# that already choose CPU options, so a child started with this (instead of
# runtime.cpu_env()) runs on XLA's CPU defaults, not on pan_jax's tuning.
XLA_CPU_DEFAULTS = '--xla_cpu_multi_thread_eigen=true'

Record = Dict[str, object]


def cpu_environment(tuned: bool) -> Dict[str, str]:
  """The environment of a measurement subprocess.

  Args:
    tuned: True for runtime.cpu_env() (XLA CPU flags, glibc huge pages), False
      for XLA's CPU defaults and the caller's malloc settings.

  Returns:
    A copy of os.environ with those settings.
  """
  env = dict(os.environ)
  if tuned:
    env.update(runtime.cpu_env())
  elif 'xla_cpu_multi_thread_eigen' not in env.get('XLA_FLAGS', ''):
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' +
                        XLA_CPU_DEFAULTS).strip()
  return env


def bench_command(mode: str, flag_args: Sequence[str]) -> List[str]:
  """The command that measures `mode` once: `python -m pan_jax.bench --one`.

  Args:
    mode: 'train', 'infer' or 'eval'.
    flag_args: the flags of that measurement (`--name=value` strings).

  Returns:
    The argument list for `run_child`.
  """
  return [sys.executable, '-m', 'pan_jax.bench', mode, '--one', *flag_args]


def peer_command(peer_dir: str, python: str, mode: str, *, encoder: str,
                 batch: int, size: int, classes: int, warmup: int, iters: int,
                 threads: int, channels_last: bool = False) -> List[str]:
  """The command that measures `mode` once with the PyTorch peer.

  Args:
    peer_dir: the folder of bench_smp.py.
    python: a Python with torch and segmentation_models_pytorch.
    mode: 'train' or 'infer'.
    encoder: smp's encoder name (config.model.backbone, e.g. 'resnet101').
    batch, size, classes, warmup, iters: as for pan_jax's measurement.
    threads: PyTorch threads.
    channels_last: the peer's model and images in channels_last memory
      format (NHWC, PyTorch's fastest CPU layout) instead of NCHW.

  Returns:
    The argument list for `run_child` (to run in peer_dir).
  """
  return [python, os.path.join(peer_dir, PEER_SCRIPT), mode,
          '--encoder', encoder, '--batch', str(batch), '--size', str(size),
          '--classes', str(classes), '--warmup', str(warmup),
          '--iters', str(iters), '--threads', str(threads),
          *(['--channels-last'] if channels_last else [])]


def run_child(command: Sequence[str], env: Dict[str, str],
              cwd: Optional[str] = None) -> Record:
  """Runs one measurement subprocess and returns the record it wrote.

  Args:
    command: the measurement's argument list; `--json FILE` is appended.
    env: its environment (`cpu_environment`).
    cwd: its working directory (default: this one).

  Returns:
    The last JSON record the subprocess appended to FILE.

  Raises:
    RuntimeError: it failed or wrote no record (its output is in the message).
  """
  with tempfile.NamedTemporaryFile('r', suffix='.json') as out:
    proc = subprocess.run([*command, '--json', out.name], env=env, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False)
    lines = [line for line in out.read().splitlines() if line.strip()]
  if proc.returncode or not lines:
    raise RuntimeError(f'measurement failed ({" ".join(command)}):\n'
                       f'{proc.stdout[-3000:]}')
  return json.loads(lines[-1])


def side_by_side(mode: str, ours: Callable[[], Record],
                 peers: Dict[str, Callable[[], Record]],
                 rounds: int) -> List[Record]:
  """Measures pan_jax, alternating with the peers, and prints every round.

  Args:
    mode: the mode's name, for the printed lines.
    ours: measures pan_jax once (a subprocess).
    peers: {side name ('smp', 'smp_channels_last'): measures that peer
      once}; empty for pan_jax alone (one round).
    rounds: rounds with peers.

  Returns:
    The records in the order measured, each with `side` ('pan_jax' or the
    peer's name) and `round` added.
  """
  records, ratios = [], {side: [] for side in peers}
  cpu_ratios = {side: [] for side in peers}
  for r in range(rounds if peers else 1):
    mine = dict(ours(), side='pan_jax', round=r)
    records.append(mine)
    print(f'[{mode}] pan_jax round {r}: {_describe(mine)}', flush=True)
    for side, peer in peers.items():
      theirs = dict(peer(), side=side, round=r)
      records.append(theirs)
      ratio = _seconds(mine) / _seconds(theirs)
      ratios[side].append(ratio)
      line = (f'[{mode}] {side} round {r}: {_describe(theirs)}  '
              f'ratio pan_jax/{side} time = {ratio:.2f}')
      cpu_mine, cpu_theirs = _cpu_seconds(mine), _cpu_seconds(theirs)
      if cpu_mine and cpu_theirs:
        cpu_ratios[side].append(cpu_mine / cpu_theirs)
        line += f', CPU-seconds = {cpu_mine / cpu_theirs:.2f}'
      print(line, flush=True)
  for side, values in ratios.items():
    print(f'[{mode}] median time ratio pan_jax/{side} over {len(values)} '
          f'rounds: {statistics.median(values):.2f} (< 1 = pan_jax faster)')
    if cpu_ratios[side]:
      print(f'[{mode}] median CPU-seconds ratio pan_jax/{side} over '
            f'{len(cpu_ratios[side])} rounds: '
            f'{statistics.median(cpu_ratios[side]):.2f} (a shared machine '
            'moves it less than the time)')
  return records


def _cpu_seconds(record: Record) -> Optional[float]:
  """CPU-seconds per step of a record: pan_jax's median_cpu_s, or the
  peer's times_s x self_cores (the cores it used); None if neither."""
  if record.get('median_cpu_s'):
    return float(record['median_cpu_s'])
  times, cores = record.get('times_s'), record.get('self_cores')
  if times and cores and len(times) == len(cores):
    return statistics.median(t * c for t, c in zip(times, cores))
  return None


def _seconds(record: Record) -> float:
  """The step time of a record (the peer names it in its own ways)."""
  for key in ('median_s', 'step_s', 'time_s', 'median'):
    if key in record:
      return float(record[key])
  raise KeyError(f'no timing in record {sorted(record)}')


def _describe(record: Record) -> str:
  parts = []
  for key in ('median_s', 'median_cpu_s', 'median_quiet_s', 'images_per_s',
              'peak_rss_mib', 'xla_temp_mib', 'compile_s'):
    if key in record:
      value = record[key]
      parts.append(f'{key}={value:.3f}' if isinstance(value, float)
                   else f'{key}={value}')
  return ' '.join(parts) or json.dumps(record)
