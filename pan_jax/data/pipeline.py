"""grain input pipelines: training (augmented crops), evaluation (full images).

Training, per process:
  source -> shuffle(seed) (a new permutation each epoch) -> repeat ->
  RandomScaleCrop -> RandomFlip -> this process's rows
  [process_index::process_count] -> Normalize ->
  batch(global_batch // process_count) -> threads -> multiprocess prefetch
  (config.data.num_workers; 0 = in process).
The order and the augmentation are those of one global stream (grain seeds
each example's augmentation from its position in it), and global batch i is
its examples [i * B, (i + 1) * B) whatever the process count: each process
reads only the examples of its rows, and 2 processes x 4 devices train on
exactly the batches of 1 process x 8 devices (their rows in another order,
which the mean loss and the global BatchNorm statistics do not see).
Batches are formed before the prefetch, so their content does not depend on
the worker count; the iterator state (grain get_state / set_state, or
grain.checkpoint.CheckpointSave / CheckpointRestore in an Orbax checkpoint) is
a position, and a restored iterator yields exactly the batches that would
have come next. It restores only with the same process count and worker count.

Sharding uses grain slicing with an explicit process index / count (rather
than tfds.split_for_jax_process) so that it can be tested without jax
processes; callers pass jax.process_index() / jax.process_count().

Evaluation, per process: the process's strided share of the split, each image
normalized and padded to config.eval.canvas_size, plus filler examples
(valid=False) so that every process yields the same number of batches and no
example is dropped or repeated.

Worker processes are started with `spawn`: programs using num_workers > 0 must
guard their entry point (`if __name__ == '__main__'`) and parse absl flags.
"""

import math
from typing import Any, Optional

from absl import flags
import grain
import numpy as np
from pan_jax import errors
from pan_jax.data import records
from pan_jax.data import sources
from pan_jax.data import transforms

# Threads per process that read and transform batches.
_READ_THREADS = 2


def build_train_iter(config, process_index: int = 0, process_count: int = 1):
  """The training iterator of one process.

  Args:
    config: the whole config (fields seed, global_batch_size, data.*).
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).

  Returns:
    A grain DatasetIterator (get_state / set_state; close it when done) of
    {'image': float32 [b, crop, crop, 3] normalized, 'label': int32 [b, crop,
    crop] with 255 = ignore}, b = global_batch_size // process_count.

  Raises:
    ValueError: batch not divisible by process_count, or too few examples.
  """
  data = config.data
  batch_size = _per_process(config.global_batch_size, process_count)
  source = sources.open_split(data, data.train_split)
  if len(source) < process_count:
    raise errors.DataError(
        f'split {data.train_split!r} has {len(source)} examples, fewer than '
        f'the {process_count} processes')
  dataset = grain.MapDataset.source(source)
  dataset = dataset.shuffle(seed=config.seed)
  dataset = dataset.repeat()
  # Seeded per position in the global stream: the same augmentation of an
  # example on any process count.
  seed = _augmentation_seed(config.seed)
  dataset = dataset.random_map(
      transforms.RandomScaleCrop(int(data.crop_size), float(data.min_scale),
                                 float(data.max_scale)), seed=seed)
  dataset = dataset.random_map(transforms.RandomFlip(), seed=seed + 1)
  dataset = dataset.map(_KeepKeys(('image', 'label')))
  # Lazy: only this process's examples are read and augmented.
  dataset = dataset[process_index::process_count]
  workers = int(data.num_workers)
  if not workers:
    dataset = dataset.map(transforms.Normalize())
  dataset = dataset.batch(batch_size, drop_remainder=True)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=_READ_THREADS,
      prefetch_buffer_size=max(int(data.prefetch_buffer_size), 1)))
  if workers:
    # grain's process prefetch reads its own absl flags; a program that did
    # not parse flags (a notebook, a test) gets their defaults instead of an
    # UnparsedFlagAccessError. Parsing later still works.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers,
        per_worker_buffer_size=max(int(data.prefetch_buffer_size), 1)))
    # Batches cross from the workers as uint8 (4x fewer bytes than float32);
    # normalizing a batch here costs ~1 ms per 512x512 image.
    dataset = dataset.map(transforms.Normalize())
  return iter(dataset)


class EvalBatches:
  """The evaluation batches of one process: iterable (again), with a length.

  Each batch: {'image': float32 [b, Hc, Wc, 3] (normalized, padding 0),
  'label': int32 [b, Hc, Wc] (padding 255), 'image_size': int32 [b, 2] (valid
  height, width), 'valid': bool [b] (False = filler), 'index': int32 [b]
  (position in the split, -1 for fillers)}. Fillers are zero images with
  all-255 labels and image_size = the canvas.
  """

  def __init__(self, dataset, num_batches: int, num_examples: int):
    self._dataset = dataset
    self.num_batches = num_batches
    # Real examples of this process (fillers not counted).
    self.num_examples = num_examples

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self):
    return iter(self._dataset)


def build_eval_iter(config, split: Optional[str] = None,
                    batch_size: Optional[int] = None, process_index: int = 0,
                    process_count: int = 1) -> EvalBatches:
  """Evaluation batches of one process.

  Every example of the split appears exactly once over all processes; every
  process yields the same number of batches.

  Args:
    config: the whole config (fields data.*, eval.canvas_size, eval.mode,
      eval.batch_size).
    split: default config.data.eval_split.
    batch_size: examples per batch on this process; default
      ceil(config.eval.batch_size / process_count).
    process_index: this process.
    process_count: number of processes.

  Returns:
    EvalBatches (see its docstring).

  Raises:
    ValueError: an image larger than config.eval.canvas_size, or an empty
      split.
  """
  split = split or config.data.eval_split
  if batch_size is None:
    batch_size = max(1, math.ceil(config.eval.batch_size / process_count))
  canvas_h, canvas_w = (int(v) for v in config.eval.canvas_size)
  check_eval_canvas(config, split)
  source = sources.open_split(config.data, split)
  if not len(source):
    raise errors.DataError(f'split {split!r} of {config.data.name} is empty')
  indices = list(range(process_index, len(source), process_count))
  # The largest share has ceil(n / process_count) examples.
  num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)
  padded = indices + [-1] * (num_batches * batch_size - len(indices))
  dataset = grain.MapDataset.source(padded)
  dataset = dataset.map(_EvalExample(source, canvas_h, canvas_w))
  dataset = dataset.batch(batch_size)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=_READ_THREADS, prefetch_buffer_size=2))
  return EvalBatches(dataset, num_batches, len(indices))


def check_eval_canvas(config, split: str) -> None:
  """Raises ValueError unless config.eval.canvas_size holds `split`'s images.

  Uses the largest image size recorded in the dataset's metadata, so it
  fails before anything is compiled or read (nothing when it is unknown;
  PadToSize still checks each image).

  Args:
    config: the whole config (data.*, eval.canvas_size).
    split: the split to be evaluated.
  """
  largest = sources.max_image_size(config.data, split)
  if largest:
    transforms.check_canvas_holds(
        largest, config.eval.canvas_size,
        f'the largest image of {config.data.name}/{split}')


class _EvalExample(grain.transforms.Map):
  """Split index -> normalized, padded example (or a filler for -1)."""

  def __init__(self, source, canvas_h: int, canvas_w: int):
    self._source = source
    self._canvas_h, self._canvas_w = canvas_h, canvas_w
    self._normalize = transforms.Normalize()
    self._pad = transforms.PadToSize(canvas_h, canvas_w)

  def map(self, index: int) -> dict[str, Any]:
    if index < 0:
      return {
          'image': np.zeros((self._canvas_h, self._canvas_w, 3), np.float32),
          'label': np.full((self._canvas_h, self._canvas_w),
                           records.IGNORE_LABEL, np.int32),
          'image_size': np.array([self._canvas_h, self._canvas_w], np.int32),
          'valid': np.array(False), 'index': np.array(-1, np.int32)}
    example = self._pad.map(self._normalize.map(self._source[index]))
    return {'image': example['image'], 'label': example['label'],
            'image_size': example['image_size'], 'valid': np.array(True),
            'index': np.array(index, np.int32)}


class _KeepKeys(grain.transforms.Map):
  """Drops every field but `keys` (file names do not go into batches)."""

  def __init__(self, keys):
    self._keys = tuple(keys)

  def map(self, element):
    return {key: element[key] for key in self._keys}


def _per_process(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise errors.ConfigError(
        f'global_batch_size={global_batch_size} is not divisible by the '
        f'process count {process_count}')
  return global_batch_size // process_count


def _augmentation_seed(seed: int) -> int:
  """A 32-bit seed for the augmentation from numpy's SeedSequence."""
  return int(np.random.SeedSequence([seed, 0]).generate_state(1)[0]
             ) % (2**32 - 2)
