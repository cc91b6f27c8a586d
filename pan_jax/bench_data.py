"""Benchmark of the training input pipeline (`python -m pan_jax.bench data`).

Builds a temporary tfds dataset of VOC-sized records (500x375 JPEG images
with 8-bit label PNGs, rendered by the synthetic generator), then runs the
training pipeline exactly as training does - decode, random scale 0.5-2,
flip, 512x512 crop, normalize, batch - with 0, 1 and 2 worker processes and
nothing consuming the batches. Prints images/s and images per CPU-second
("per core": the CPU time of this process, its threads and its worker
processes during the timed window, read from /proc on Linux).

Options (a list of strings, e.g. ['--batches=30']): --images (records in the
temporary dataset, 64), --batch_size (8), --batches (timed batches, 20),
--warmup (batches before timing, 3), --crop_size (512), --workers (0,1,2).
"""

import argparse
import os
import shutil
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image

from pan_jax.data import builder
from pan_jax.data import folder
from pan_jax.data import pipeline
from pan_jax.data import synthetic

VOC_HEIGHT, VOC_WIDTH = 375, 500


def _options(args):
  parser = argparse.ArgumentParser(prog='python -m pan_jax.bench data')
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--crop_size', type=int, default=512)
  parser.add_argument('--workers', default='0,1,2')
  if args is None or isinstance(args, (list, tuple)):
    return parser.parse_args(list(args or []))
  # An already parsed namespace: take what it has, defaults for the rest.
  defaults = parser.parse_args([])
  for name in vars(defaults):
    if getattr(args, name, None) is not None:
      setattr(defaults, name, getattr(args, name))
  return defaults


def write_voc_sized_dataset(data_dir: str, num_images: int) -> str:
  """Builds a 'folder' dataset of 500x375 JPEGs + label PNGs in data_dir."""
  source = os.path.join(data_dir, 'source')
  for index in range(num_images):
    image, label = synthetic.render(
        synthetic.example_rng(0, 'train', index), VOC_HEIGHT, VOC_WIDTH)
    for kind, array, extension in (('images', image, 'jpg'),
                                   ('labels', label, 'png')):
      path = os.path.join(source, kind, 'train', f'{index:05d}.{extension}')
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(array).save(path, quality=90)
  spec = folder.scan(source, num_classes=synthetic.NUM_CLASSES)
  path, _ = builder.build(spec, data_dir)
  return path


def _cpu_seconds() -> float:
  """CPU time (user + system) of this process and all its descendants."""
  ticks = os.sysconf('SC_CLK_TCK')
  parents, times = {}, {}
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    # After the ')' of the command name: state ppid ... utime(12) stime(13).
    parents[int(entry)] = int(fields[1])
    times[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
  tree, frontier = set(), {os.getpid()}
  while frontier:
    tree |= frontier
    frontier = {pid for pid, parent in parents.items()
                if parent in frontier and pid not in tree}
  return sum(times.get(pid, 0.0) for pid in tree)


def measure(data_dir: str, workers: int, options) -> dict:
  """Times the training pipeline with `workers` worker processes."""
  config = ml_collections.ConfigDict({
      'seed': 0, 'global_batch_size': options.batch_size,
      'data': {'name': 'folder', 'data_dir': data_dir, 'train_split': 'train',
               'crop_size': options.crop_size, 'min_scale': 0.5,
               'max_scale': 2.0, 'num_workers': workers,
               'prefetch_buffer_size': 2}})
  iterator = pipeline.build_train_iter(config)
  try:
    for _ in range(options.warmup):
      batch = next(iterator)
    assert batch['image'].shape == (options.batch_size, options.crop_size,
                                    options.crop_size, 3)
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    for _ in range(options.batches):
      next(iterator)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start
  finally:
    iterator.close()
  images = options.batches * options.batch_size
  return {'workers': workers, 'images_per_s': images / wall,
          'cpu_cores_busy': cpu / wall,
          'images_per_cpu_s': images / cpu if cpu > 0 else float('nan')}


def run(args=None) -> list[dict]:
  """Runs the benchmark, prints a table and returns its rows.

  Args:
    args: None, a list of option strings, or a namespace (module docstring).

  Returns:
    One dict per worker count: workers, images_per_s, cpu_cores_busy,
    images_per_cpu_s.
  """
  options = _options(args)
  temp = tempfile.mkdtemp(prefix='pan_jax_bench_data_')
  try:
    start = time.perf_counter()
    write_voc_sized_dataset(temp, options.images)
    print(f'built {options.images} records of {VOC_WIDTH}x{VOC_HEIGHT} JPEG '
          f'+ PNG label in {time.perf_counter() - start:.1f} s')
    print(f'train pipeline: decode, scale 0.5-2, flip, crop '
          f'{options.crop_size}, normalize, batch {options.batch_size}; '
          f'{options.batches} batches timed after {options.warmup}; '
          f'{os.cpu_count()} CPU cores on this machine')
    print(f'{"workers":>8} {"images/s":>10} {"cores busy":>11} '
          f'{"images/s per core":>18}')
    rows = []
    for workers in (int(w) for w in str(options.workers).split(',')):
      row = measure(temp, workers, options)
      rows.append(row)
      print(f'{workers:>8} {row["images_per_s"]:>10.1f} '
            f'{row["cpu_cores_busy"]:>11.2f} {row["images_per_cpu_s"]:>18.1f}')
    return rows
  finally:
    shutil.rmtree(temp, ignore_errors=True)


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  run(sys.argv[1:])
