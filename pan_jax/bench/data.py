"""Benchmark of the training input pipeline (`python -m pan_jax.bench data`).

Builds a temporary tfds dataset of VOC-sized records (500x375 JPEG images
with 8-bit label PNGs, rendered by the synthetic generator), then runs the
training pipeline exactly as training does - decode, random scale 0.5-2,
flip, crop (512x512 by default), normalize, batch - with each number of
worker processes asked for (0, 1 and 2 by default) and nothing consuming the
batches. Prints images/s and images per CPU-second ("per core": the CPU
time of this process, its threads and its worker processes during the timed
window, read from /proc on Linux). It runs in the bench's own process: the
pipeline starts its worker processes itself.
"""

import os
import shutil
import tempfile
import time
from typing import Dict, List, Sequence

import ml_collections
from PIL import Image

from pan_jax.data import builder
from pan_jax.data import folder
from pan_jax.data import pipeline
from pan_jax.data import synthetic

VOC_HEIGHT, VOC_WIDTH = 375, 500


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


def measure(data_dir: str, workers: int, *, batch: int, iters: int,
            warmup: int, size: int) -> Dict[str, float]:
  """Times the training pipeline with `workers` worker processes.

  Args:
    data_dir: holds the dataset of `write_voc_sized_dataset`.
    workers: worker processes (config.data.num_workers).
    batch: images per batch.
    iters: timed batches.
    warmup: batches before timing (at least 1).
    size: crop side.

  Returns:
    workers, images_per_s, cpu_cores_busy, images_per_cpu_s.
  """
  config = ml_collections.ConfigDict({
      'seed': 0, 'global_batch_size': batch,
      'data': {'name': 'folder', 'data_dir': data_dir, 'train_split': 'train',
               'crop_size': size, 'min_scale': 0.5,
               'max_scale': 2.0, 'num_workers': workers,
               'prefetch_buffer_size': 2}})
  iterator = pipeline.build_train_iter(config)
  try:
    for _ in range(max(1, warmup)):
      first = next(iterator)
    assert first['image'].shape == (batch, size, size, 3)
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    for _ in range(iters):
      next(iterator)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start
  finally:
    iterator.close()
  images = iters * batch
  return {'workers': workers, 'images_per_s': images / wall,
          'cpu_cores_busy': cpu / wall,
          'images_per_cpu_s': images / cpu if cpu > 0 else float('nan')}


def run(*, images: int, batch: int, iters: int, warmup: int, size: int,
        workers: Sequence[int]) -> List[Dict[str, float]]:
  """Runs the benchmark, prints a table and returns its rows.

  Args:
    images: records in the temporary dataset.
    batch: images per batch.
    iters: timed batches per worker count.
    warmup: batches before timing.
    size: crop side.
    workers: the worker process counts to measure.

  Returns:
    One dict per worker count (see `measure`).
  """
  temp = tempfile.mkdtemp(prefix='pan_jax_bench_data_')
  try:
    start = time.perf_counter()
    write_voc_sized_dataset(temp, images)
    print(f'built {images} records of {VOC_WIDTH}x{VOC_HEIGHT} JPEG '
          f'+ PNG label in {time.perf_counter() - start:.1f} s')
    print(f'train pipeline: decode, scale 0.5-2, flip, crop '
          f'{size}, normalize, batch {batch}; '
          f'{iters} batches timed after {warmup}; '
          f'{os.cpu_count()} CPU cores on this machine')
    print(f'{"workers":>8} {"images/s":>10} {"cores busy":>11} '
          f'{"images/s per core":>18}')
    rows = []
    for count in workers:
      row = measure(temp, count, batch=batch, iters=iters, warmup=warmup,
                    size=size)
      rows.append(row)
      print(f'{count:>8} {row["images_per_s"]:>10.1f} '
            f'{row["cpu_cores_busy"]:>11.2f} {row["images_per_cpu_s"]:>18.1f}')
    return rows
  finally:
    shutil.rmtree(temp, ignore_errors=True)

