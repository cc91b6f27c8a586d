"""Benchmark of the whole training loop (`python -m pan_jax.bench loop`).

Runs `python -m pan_jax.main` for a few steps of one config in a fresh
process and a temporary workdir, and reads the steps/s it wrote to
metrics.jsonl: data pipeline, sharded train step, metrics and asynchronous
checkpoints included, compilation excluded (training times its rate from the
first finished step). Start-up and the rest (imports, tracing, compilation,
restore, the final save and validation) is reported as the overhead. The
bare train step of the same network at the same shapes (`bench train`, in
its own process) is measured next to it: loop_over_bare is the loop's
images/s over the bare step's (1.0 = the loop costs nothing on top).

A config that reads a prepared dataset (configs/demo.py: the synthetic set,
`python -m pan_jax.data.prepare --dataset=synthetic ...`) is skipped with a
message when that dataset is not in its data.data_dir.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import ml_collections

from pan_jax.data import sources


def missing_dataset(config: ml_collections.ConfigDict) -> Optional[str]:
  """Why `config` cannot train here, or None when its dataset is ready.

  Args:
    config: a training config (reads config.data.name and data_dir).

  Returns:
    None for the in-memory 'fake' set or a prepared dataset, else the
    message that says how to prepare it.
  """
  if config.data.name == sources.FAKE_NAME:
    return None
  try:
    sources.dataset_dir(config.data)
  except FileNotFoundError as e:
    return str(e)
  return None


def step_shapes(config: ml_collections.ConfigDict) -> Tuple[int, int, int]:
  """(batch, crop side, classes) of a training config, for its bare step."""
  return (config.global_batch_size, config.data.crop_size,
          sources.get_meta(config.data).num_classes)


def measure(config_args: Sequence[str], *, steps: int, log_every: int,
            env: Dict[str, str]) -> Dict[str, Any]:
  """Trains `steps` steps with `python -m pan_jax.main` in a subprocess.

  Args:
    config_args: `--config=path[:arg]` and its `--config.x=y` overrides.
    steps: training steps (config.total_steps).
    log_every: steps per logged (timed) interval.
    env: the subprocess's environment (harness.cpu_environment).

  Returns:
    steps, steps_per_s (median over the logged intervals), images_per_s,
    wall_s, overhead_s (wall time that is not steady-state training),
    final_loss.

  Raises:
    RuntimeError: the training run failed (its stderr is in the message).
  """
  workdir = tempfile.mkdtemp(prefix='pan_jax_bench_loop_')
  try:
    # The bench's settings come after the user's overrides: they win.
    command = [
        sys.executable, '-m', 'pan_jax.main', *config_args,
        f'--workdir={workdir}', f'--config.total_steps={steps}',
        f'--config.log_every_steps={log_every}',
        f'--config.checkpoint_every_steps={steps}',
        '--config.eval_every_steps=0']
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
      raise RuntimeError(f'{" ".join(command)} failed:\n{proc.stderr[-3000:]}')
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f if line.strip()]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  rates = [r['steps_per_sec'] for r in records if 'steps_per_sec' in r]
  train_records = [r for r in records if 'loss' in r]
  batch = None
  for r in train_records:
    if 'images_per_sec' in r and r.get('steps_per_sec'):
      batch = round(r['images_per_sec'] / r['steps_per_sec'])
  steps_per_s = statistics.median(rates) if rates else float('nan')
  return {'steps': steps, 'steps_per_s': steps_per_s,
          'images_per_s': steps_per_s * batch if batch else float('nan'),
          'wall_s': wall,
          # Everything that is not steady-state training: imports, tracing,
          # compilation, the first step, the final save and validation.
          'overhead_s': wall - steps / steps_per_s if rates else wall,
          'final_loss': train_records[-1]['loss'] if train_records else None}


def run(config: ml_collections.ConfigDict, config_args: Sequence[str], *,
        config_name: str, steps: int, log_every: int, env: Dict[str, str],
        bare_step: Optional[Callable[[], Dict[str, Any]]] = None
        ) -> Optional[Dict[str, Any]]:
  """Measures the training loop of one config and prints its row.

  Args:
    config: the parsed config (for the dataset check).
    config_args: the same config for the training command (see `measure`).
    config_name: its `path[:arg]`, for the row.
    steps: training steps.
    log_every: steps per logged interval.
    env: the training process's environment.
    bare_step: measures the bare train step at the loop's shapes (a
      `bench train` record), or None to skip it.

  Returns:
    config and the fields of `measure`, with bare_images_per_s and
    loop_over_bare when bare_step is given; None when the config was
    skipped because its dataset is not prepared.
  """
  print(f'{"config":<24} {"steps/s":>8} {"images/s":>9} {"wall s":>7} '
        f'{"overhead s":>10} {"bare images/s":>13} {"loop/bare":>9}')
  missing = missing_dataset(config)
  if missing:
    print(f'{config_name:<24} skipped: {missing}')
    return None
  row = dict(config=config_name,
             **measure(config_args, steps=steps, log_every=log_every,
                       env=env))
  bare = ''
  if bare_step:
    row['bare_images_per_s'] = bare_step()['images_per_s']
    row['loop_over_bare'] = row['images_per_s'] / row['bare_images_per_s']
    bare = (f' {row["bare_images_per_s"]:>13.1f} '
            f'{row["loop_over_bare"]:>9.2f}')
  print(f'{config_name:<24} {row["steps_per_s"]:>8.2f} '
        f'{row["images_per_s"]:>9.1f} {row["wall_s"]:>7.1f} '
        f'{row["overhead_s"]:>10.1f}{bare}', flush=True)
  return row
