"""Training benchmark: throughput of the whole training loop.

Runs `python -m pan_jax.main` for a few steps per config, each in a fresh
process and a temporary workdir, and reads the steps/s it wrote to
metrics.jsonl: data pipeline, sharded train step, metrics and asynchronous
checkpoints included, compilation excluded (the first logged interval is
dropped). Startup (imports, tracing, compilation, restore) is reported
separately. `python -m pan_jax.bench train` covers the bare train step.

  python -m pan_jax.bench_train [--configs=configs/smoke.py,configs/demo.py]
      [--steps=30] [--log_every=10] [--data_dir=data] [--no-cpu-tuning]

configs/demo.py needs the synthetic dataset in --data_dir (python -m
pan_jax.data.prepare --dataset=synthetic ...); it is skipped with a message
when absent.
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _options(args):
  if isinstance(args, argparse.Namespace):
    return args
  parser = argparse.ArgumentParser(prog='python -m pan_jax.bench_train',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='configs/smoke.py,configs/demo.py')
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--log_every', type=int, default=10)
  parser.add_argument('--data_dir', default='data',
                      help='prepared datasets (config.data.data_dir)')
  parser.add_argument('--no-cpu-tuning', dest='cpu_tuning',
                      action='store_false')
  return parser.parse_args(args or [])


def _needs_data(config_path: str, data_dir: str) -> bool:
  """Whether a config reads a prepared dataset that is not in data_dir."""
  path = os.path.join(REPO, config_path.split(':')[0])
  spec = importlib.util.spec_from_file_location('_bench_config', path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, REPO)  # Config files import `configs.base`.
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(REPO)
  data = module.get_config().data
  return data.name != 'fake' and not os.path.isdir(
      os.path.join(data_dir, data.name))


def measure(config_path: str, options) -> dict:
  """Trains `options.steps` steps of one config in a subprocess."""
  env = dict(os.environ)
  if options.cpu_tuning:
    from pan_jax import runtime  # pylint: disable=g-import-not-at-top
    env.update(runtime.CPU_ENV)
  workdir = tempfile.mkdtemp(prefix='pan_jax_bench_train_')
  try:
    command = [
        sys.executable, '-m', 'pan_jax.main', f'--config={config_path}',
        f'--workdir={workdir}', f'--config.total_steps={options.steps}',
        f'--config.log_every_steps={options.log_every}',
        f'--config.checkpoint_every_steps={options.steps}',
        '--config.eval_every_steps=0',
        f'--config.data.data_dir={os.path.abspath(options.data_dir)}']
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                          text=True, check=False)
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
  return {'config': config_path, 'steps': options.steps,
          'steps_per_s': steps_per_s,
          'images_per_s': steps_per_s * batch if batch else float('nan'),
          'wall_s': wall,
          # Everything that is not steady-state training: imports, tracing,
          # compilation, the first step, the final save and validation.
          'overhead_s': wall - options.steps / steps_per_s if rates else wall,
          'final_loss': train_records[-1]['loss'] if train_records else None}


def run(args=None) -> list[dict]:
  """Runs the benchmark, prints a table and returns its rows.

  Args:
    args: None, a list of option strings, or a namespace (module docstring).

  Returns:
    One dict per config: config, steps, steps_per_s, images_per_s, wall_s,
    overhead_s, final_loss.
  """
  options = _options(args)
  print(f'{"config":<24} {"steps/s":>8} {"images/s":>9} {"wall s":>7} '
        f'{"overhead s":>10}')
  rows = []
  for config_path in options.configs.split(','):
    if _needs_data(config_path, options.data_dir):
      print(f'{config_path:<24} skipped: its dataset is not prepared in '
            f'{options.data_dir} (python -m pan_jax.data.prepare ...)')
      continue
    row = measure(config_path, options)
    rows.append(row)
    print(f'{config_path:<24} {row["steps_per_s"]:>8.2f} '
          f'{row["images_per_s"]:>9.1f} {row["wall_s"]:>7.1f} '
          f'{row["overhead_s"]:>10.1f}', flush=True)
  return rows


if __name__ == '__main__':
  run(sys.argv[1:])
