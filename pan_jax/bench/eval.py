"""Benchmark of evaluation (`python -m pan_jax.bench eval`).

Measures images/s of the jitted evaluation step - inference on the padded
canvas plus the on-device confusion matrix, exactly what `evaluate` runs per
batch - for single-scale and for multi-scale {0.5, ..., 1.75} + flip, on
random VOC-sized images (500x375 on a 512x512 canvas) with randomly
initialised weights (speed does not depend on them), of the network of
`--eval_config` (default configs/voc.py: the paper's ResNet-101 PAN). Each
setting runs in a fresh subprocess (harness.py: own compile cache and peak
RSS); the batch is sharded over every device.
"""

import resource
import time
from typing import Any, Callable, Dict, List, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pan_jax import evaluate
from pan_jax import inference
from pan_jax import models
from pan_jax import sharding

MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
SETTINGS = ('single', 'multi', 'slide')


def measure(config: ml_collections.ConfigDict, setting: str, *,
            config_name: str, canvas: int, image_size: Sequence[int],
            batch: int, iters: int, warmup: int, classes: int, dtype: str,
            scales: Sequence[float]) -> Dict[str, Any]:
  """Times the eval step of one setting in this process.

  Args:
    config: the network's config (config.model, config.eval; not modified).
    setting: 'single', 'multi' (`scales` + flip) or 'slide' (windows of
      config.eval.window_size, single scale).
    config_name: the config's `path[:arg]`, for the record.
    canvas: side of the square padded canvas.
    image_size: (height, width) of the valid image on it (clipped to canvas).
    batch: images per step, rounded up to a multiple of the device count; 0
      for one per device.
    iters: timed steps.
    warmup: untimed steps after the compiling one.
    classes: number of classes.
    dtype: compute dtype, 'float32' or 'bfloat16'.
    scales: the scales of 'multi'.

  Returns:
    A dict: setting, scales, flip, mode, batch, canvas, image_size,
    images_per_s, seconds_per_image, median_s, compile_s, peak_rss_mib,
    devices, backend, model, dtype.
  """
  config = config.copy_and_resolve_references()
  config.compute_dtype = dtype
  model = models.create_model(config, classes)
  mesh = sharding.make_mesh()
  batch_size = evaluate.global_batch_size(batch or mesh.devices.size, mesh)
  if setting == 'single':
    infer = inference.InferenceOptions.from_config(
        config.eval, mode='whole', scales=(1.0,), flip=False)
  elif setting == 'multi':
    infer = inference.InferenceOptions.from_config(
        config.eval, mode='whole',
        scales=[float(s) for s in scales], flip=True)
  elif setting == 'slide':
    infer = inference.InferenceOptions.from_config(
        config.eval, mode='slide', scales=(1.0,), flip=False)
  else:
    raise ValueError(f'setting {setting!r}: expected one of {SETTINGS}')
  height, width = (min(int(v), canvas) for v in image_size)
  rng = np.random.default_rng(0)
  local = batch_size // jax.process_count()
  inputs = sharding.to_global({
      'image': rng.normal(size=(local, canvas, canvas, 3)).astype(np.float32),
      'label': rng.integers(0, classes, (local, canvas, canvas),
                            dtype=np.int32),
      'image_size': np.tile(np.array([[height, width]], np.int32),
                            (local, 1)),
      'valid': np.ones((local,), bool)}, mesh)
  # Parameter shapes do not depend on the input size: init small.
  side = models.min_input_size(config)
  variables = jax.jit(lambda key: model.init(
      key, jnp.zeros((1, side, side, 3)), train=False))(jax.random.key(0))
  variables = jax.device_put(variables, sharding.replicated(mesh))
  eval_step = evaluate.make_eval_step(model, classes, infer, mesh)
  confusion, count = jax.device_put(
      (np.zeros((classes,) * 2, np.int32), np.zeros((), np.int32)),
      sharding.replicated(mesh))

  def step(confusion, count):
    confusion, count, _ = eval_step(variables, inputs, confusion, count)
    jax.block_until_ready(confusion)
    return confusion, count

  start = time.perf_counter()
  confusion, count = step(confusion, count)  # Compiles.
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    confusion, count = step(confusion, count)
  times = []
  for _ in range(iters):
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
      'model': f'{config.model.backbone} {config_name}',
      'dtype': dtype,
  }


def run(settings: Sequence[str],
        measure_setting: Callable[[str], Dict[str, Any]], *,
        config_name: str, canvas: int, image_size: Sequence[int],
        iters: int, warmup: int) -> List[Dict[str, Any]]:
  """Measures every setting, prints a table and returns its rows.

  Args:
    settings: the settings to measure, in order (see `measure`).
    measure_setting: measures one setting (in a subprocess) and returns its
      row; the other arguments only describe it in the table's header.
    config_name: the network's config `path[:arg]`.
    canvas: side of the canvas.
    image_size: (height, width) of the valid image.
    iters: timed steps.
    warmup: untimed steps after the compiling one.

  Returns:
    One dict per setting (see `measure`).
  """
  print(f'eval step (inference + confusion matrix), {config_name}, '
        f'{",".join(str(v) for v in image_size)} image on a {canvas}^2 '
        f'canvas, {iters} timed steps after {warmup + 1}')
  print(f'{"setting":>8} {"batch":>6} {"images/s":>9} {"s/image":>8} '
        f'{"compile s":>10} {"peak RSS MiB":>13}')
  rows = []
  for setting in settings:
    row = measure_setting(setting)
    rows.append(row)
    print(f'{setting:>8} {row["batch"]:>6} {row["images_per_s"]:>9.3f} '
          f'{row["seconds_per_image"]:>8.2f} {row["compile_s"]:>10.1f} '
          f'{row["peak_rss_mib"]:>13.0f}', flush=True)
  return rows
