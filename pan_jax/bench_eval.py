"""Benchmark of evaluation (`python -m pan_jax.bench eval`).

Measures images/s of the jitted evaluation step - inference on the padded
canvas plus the on-device confusion matrix, exactly what `evaluate` runs per
batch - for single-scale and for multi-scale {0.5, ..., 1.75} + flip, on
random VOC-sized images (500x375 on a 512x512 canvas) with randomly
initialised weights (speed does not depend on them). Each setting runs in a
fresh subprocess (own compile cache and peak RSS) with the CPU settings of
pan_jax.runtime (harmless on GPU / TPU); the batch is sharded over every
device.

Options (a list of strings, e.g. ['--batches=2']): --eval_config (config
file[:arg], default configs/voc.py: the paper's ResNet-101 PAN), --settings
(single,multi; also slide), --canvas (512), --image_size (375,500: valid
height,width), --batch_size (images per step, rounded up to the device
count; default the device count), --batches (timed steps, 3), --warmup
(untimed steps after the compiling one, 1), --classes (21), --dtype
(float32 | bfloat16), --scales (the multi-scale set).
"""

import argparse
import json
import os
import resource
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI_SCALES = '0.5,0.75,1.0,1.25,1.5,1.75'
SETTINGS = ('single', 'multi', 'slide')


def _parse(args) -> argparse.Namespace:
  if isinstance(args, argparse.Namespace):
    return args
  parser = argparse.ArgumentParser(prog='python -m pan_jax.bench eval')
  parser.add_argument('--eval_config', default='configs/voc.py')
  parser.add_argument('--settings', default='single,multi')
  parser.add_argument('--canvas', type=int, default=512)
  parser.add_argument('--image_size', default='375,500')
  parser.add_argument('--batch_size', type=int, default=0)
  parser.add_argument('--batches', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--classes', type=int, default=21)
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--scales', default=MULTI_SCALES)
  parser.add_argument('--no-cpu-tuning', dest='cpu_tuning',
                      action='store_false')
  # Internal: measure one setting in this process, append JSON to a file.
  parser.add_argument('--one', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--json', default=None, help=argparse.SUPPRESS)
  return parser.parse_args(list(args or []))


def measure(options: argparse.Namespace, setting: str) -> Dict[str, Any]:
  """Times the eval step of one setting in this process.

  Args:
    options: parsed options (module docstring).
    setting: 'single', 'multi' (scales + flip) or 'slide' (windows of
      config.eval.window_size, single scale).

  Returns:
    A dict: setting, scales, flip, mode, batch, canvas, images_per_s,
    seconds_per_image, compile_s, peak_rss_mib, devices, backend.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pan_jax import bench_model
  from pan_jax import evaluate
  from pan_jax import inference
  from pan_jax import models
  from pan_jax import sharding
  # pylint: enable=g-import-not-at-top
  config = bench_model.load_config(options.eval_config)
  config.compute_dtype = options.dtype
  model = models.create_model(config, options.classes)
  mesh = sharding.make_mesh()
  batch_size = evaluate.global_batch_size(
      options.batch_size or mesh.devices.size, mesh)
  if setting == 'single':
    infer = inference.InferenceOptions.from_config(
        config.eval, mode='whole', scales=(1.0,), flip=False)
  elif setting == 'multi':
    infer = inference.InferenceOptions.from_config(
        config.eval, mode='whole',
        scales=[float(s) for s in options.scales.split(',')], flip=True)
  elif setting == 'slide':
    infer = inference.InferenceOptions.from_config(
        config.eval, mode='slide', scales=(1.0,), flip=False)
  else:
    raise ValueError(f'--settings: unknown {setting!r}; valid: {SETTINGS}')
  canvas = options.canvas
  height, width = (min(int(v), canvas)
                   for v in options.image_size.split(','))
  rng = np.random.default_rng(0)
  local = batch_size // jax.process_count()
  batch = sharding.to_global({
      'image': rng.normal(size=(local, canvas, canvas, 3)).astype(np.float32),
      'label': rng.integers(0, options.classes, (local, canvas, canvas),
                            dtype=np.int32),
      'image_size': np.tile(np.array([[height, width]], np.int32),
                            (local, 1)),
      'valid': np.ones((local,), bool)}, mesh)
  # Parameter shapes do not depend on the input size: init small.
  side = models.min_input_size(config)
  variables = jax.jit(lambda key: model.init(
      key, jnp.zeros((1, side, side, 3)), train=False))(jax.random.key(0))
  variables = jax.device_put(variables, sharding.replicated(mesh))
  eval_step = evaluate.make_eval_step(model, options.classes, infer, mesh)
  confusion, count = jax.device_put(
      (np.zeros((options.classes,) * 2, np.int32), np.zeros((), np.int32)),
      sharding.replicated(mesh))

  def step(confusion, count):
    confusion, count, _ = eval_step(variables, batch, confusion, count)
    jax.block_until_ready(confusion)
    return confusion, count

  start = time.perf_counter()
  confusion, count = step(confusion, count)  # Compiles.
  compile_s = time.perf_counter() - start
  for _ in range(options.warmup):
    confusion, count = step(confusion, count)
  times = []
  for _ in range(options.batches):
    start = time.perf_counter()
    confusion, count = step(confusion, count)
    times.append(time.perf_counter() - start)
  median = float(np.median(times))
  return {
      'setting': setting, 'scales': list(infer.scales), 'flip': infer.flip,
      'mode': infer.mode, 'batch': batch_size, 'canvas': canvas,
      'image_size': [height, width], 'images_per_s': batch_size / median,
      'seconds_per_image': median / batch_size, 'median_s': median,
      'compile_s': compile_s,
      'peak_rss_mib': resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 1024,
      'devices': mesh.devices.size, 'backend': jax.default_backend(),
      'model': f'{config.model.backbone} {options.eval_config}',
      'dtype': options.dtype,
  }


def _child(options: argparse.Namespace, setting: str, argv: Sequence[str]
           ) -> Dict[str, Any]:
  """Runs `measure` for one setting in a fresh subprocess (bench's runner)."""
  from pan_jax import bench  # pylint: disable=g-import-not-at-top
  command = [sys.executable, '-m', 'pan_jax.bench_eval', *argv,
             f'--one={setting}']
  return bench._run_child(  # pylint: disable=protected-access
      command, bench.cpu_environment(options.cpu_tuning), REPO)


def run(args: Optional[Any] = None) -> List[Dict[str, Any]]:
  """Runs the benchmark, prints a table and returns its rows.

  Args:
    args: None or a list of option strings (module docstring).

  Returns:
    One dict per setting (see `measure`).
  """
  argv = [a for a in (args or []) if not a.startswith(('--one', '--json'))]
  options = _parse(argv)
  settings = [s for s in options.settings.split(',') if s]
  print(f'eval step (inference + confusion matrix), {options.eval_config}, '
        f'{options.image_size} image on a {options.canvas}^2 canvas, '
        f'{options.batches} timed steps after {options.warmup + 1}')
  print(f'{"setting":>8} {"batch":>6} {"images/s":>9} {"s/image":>8} '
        f'{"compile s":>10} {"peak RSS MiB":>13}')
  rows = []
  for setting in settings:
    row = _child(options, setting, argv)
    rows.append(row)
    print(f'{setting:>8} {row["batch"]:>6} {row["images_per_s"]:>9.3f} '
          f'{row["seconds_per_image"]:>8.2f} {row["compile_s"]:>10.1f} '
          f'{row["peak_rss_mib"]:>13.0f}', flush=True)
  return rows


def main(argv: Sequence[str]) -> int:
  options = _parse(argv)
  if options.one:
    record = measure(options, options.one)
    if options.json:
      with open(options.json, 'a') as f:
        f.write(json.dumps(record) + '\n')
    print(json.dumps(record))
    return 0
  run(argv)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
