"""Dataset metadata and random-access splits.

A split is read with `open_split(config.data, split)`: for the prepared
datasets a tfds array_record data source (read back with
tfds.builder_from_directory, so no builder class and no TensorFlow is
needed), for 'fake' an in-memory set rendered on the fly. Both return, for
each index, {'image': uint8 [H, W, 3], 'label': uint8 [H, W] (255 = ignore),
'file_name': str}.

The number of classes, their names, palette and ignore value come from the
dataset's metadata (`get_meta`), never from the config.
"""

import dataclasses
import json
from typing import Any

from pan_jax import defaults
from pan_jax import errors
from pan_jax import paths
from pan_jax import runtime
from pan_jax.data import builder
from pan_jax.data import records
from pan_jax.data import synthetic
from pan_jax.data import voc
import tensorflow_datasets as tfds

# The in-memory dataset of the tests: split -> (size, min side, max side).
FAKE_NAME = 'fake'
FAKE_SPLITS = {'train': (64, 48, 96), 'val': (10, 40, 96)}
_FAKE_SEED = 1234
# Datasets that prepare.py builds, with the --dataset to name in errors.
PREPARED_DATASETS = ('voc2012_aug', 'cityscapes', 'folder', 'synthetic')
# (data_dir, name, cache_dir) of a gs:// dataset -> its local copy, checked
# once per process.
_LOCAL_COPIES: dict[tuple[str, str, str], str] = {}
# tfds' image decoder warns in every process, data workers included, that
# OpenCV is absent; a worker imports this module but never runs runtime.start.
runtime.quiet_library_logs()


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
  """What the rest of pan_jax needs to know about a dataset.

  Attributes:
    name: dataset name (config.data.name).
    num_classes: class ids are 0..num_classes-1.
    class_names: one per class id.
    palette: one (r, g, b) per class id.
    ignore_label: label value excluded from loss and metrics.
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  palette: tuple[tuple[int, int, int], ...]
  ignore_label: int = records.IGNORE_LABEL

  def to_json(self) -> str:
    """JSON text (what training writes to WORKDIR/dataset.json)."""
    return json.dumps(dataclasses.asdict(self), indent=2)

  @classmethod
  def from_json(cls, text: str) -> 'DatasetMeta':
    """Inverse of to_json (lists come back as tuples)."""
    fields = json.loads(text)
    return cls(name=fields['name'], num_classes=int(fields['num_classes']),
               class_names=tuple(fields['class_names']),
               palette=tuple(tuple(int(c) for c in colour)
                             for colour in fields['palette']),
               ignore_label=int(fields.get('ignore_label',
                                           records.IGNORE_LABEL)))


def check_classes(expected: DatasetMeta, found: DatasetMeta,
                  expected_what: str, found_what: str) -> None:
  """Raises MismatchError unless two datasets have the same classes.

  The same number of classes with the same names in the same order: a model
  trained on one is then scored, resumed or used on the other with the
  class ids meaning the same things.

  Args:
    expected: e.g. the metadata saved with a checkpoint.
    found: e.g. the metadata of the dataset it is used with.
    expected_what: what `expected` belongs to, for the message ('checkpoint
      RUN').
    found_what: what `found` belongs to ('dataset folder in DATA').

  Raises:
    MismatchError: naming both and both class lists.
  """
  mine, theirs = list(expected.class_names), list(found.class_names)
  if expected.num_classes == found.num_classes and mine == theirs:
    return
  if expected.num_classes != found.num_classes:
    problem = (f'{expected_what} has {expected.num_classes} classes but '
               f'{found_what} has {found.num_classes}')
  else:
    first = next(k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b)
    problem = (f'{expected_what} and {found_what} have {found.num_classes} '
               f'classes each but other class names (class {first} is '
               f'{mine[first]!r} in one, {theirs[first]!r} in the other)')
  raise errors.MismatchError(
      f'{problem}: {expected_what} classes {mine}, {found_what} classes '
      f'{theirs}. They must be the same classes in the same order.')


def get_meta(data_config) -> DatasetMeta:
  """The metadata of config.data.name (in config.data.data_dir).

  Args:
    data_config: config.data (fields name, data_dir).

  Returns:
    DatasetMeta.

  Raises:
    FileNotFoundError: the dataset has not been prepared.
  """
  if data_config.name == FAKE_NAME:
    return DatasetMeta(
        name=FAKE_NAME, num_classes=synthetic.NUM_CLASSES,
        class_names=synthetic.CLASS_NAMES,
        palette=voc.color_map(synthetic.NUM_CLASSES))
  metadata = _tfds_builder(data_config).info.metadata
  return DatasetMeta(
      name=data_config.name, num_classes=int(metadata['num_classes']),
      class_names=tuple(metadata['class_names']),
      palette=tuple(tuple(int(c) for c in colour)
                    for colour in metadata['palette']),
      ignore_label=int(metadata['ignore_label']))


def max_image_size(data_config, split: str):
  """(height, width) of the largest image of a split, or None if unknown."""
  if data_config.name == FAKE_NAME:
    max_side = FAKE_SPLITS[_fake_split(split)][2]
    return max_side, max_side
  sizes = _tfds_builder(data_config).info.metadata.get('max_image_size', {})
  return tuple(sizes[split]) if split in sizes else None


def has_labels(data_config, split: str) -> bool:
  """False for a split prepared without ground truth (a test split).

  Args:
    data_config: config.data (fields name, data_dir).
    split: split name.

  Returns:
    Whether the split's labels are real (datasets prepared before this was
    recorded have labels in every split).
  """
  if data_config.name == FAKE_NAME:
    return True
  metadata = _tfds_builder(data_config).info.metadata
  return split not in metadata.get('unlabeled_splits', [])


def open_split(data_config, split: str):
  """A random-access source (len, [i]) of a split's examples.

  Args:
    data_config: config.data (fields name, data_dir).
    split: split name, e.g. 'train_aug' or 'val'.

  Returns:
    A picklable source: source[i] -> {'image': uint8 [H, W, 3],
    'label': uint8 [H, W], 'file_name': str}.

  Raises:
    FileNotFoundError: dataset not prepared.
    ValueError: the dataset has no such split.
  """
  if data_config.name == FAKE_NAME:
    return FakeSource(_fake_split(split))
  tfds_builder = _tfds_builder(data_config)
  if split not in tfds_builder.info.splits:
    raise errors.ConfigError(
        f'dataset {data_config.name} at {tfds_builder.data_dir} has no split '
        f'{split!r}; it has {sorted(tfds_builder.info.splits.keys())}')
  return TfdsSource(tfds_builder.as_data_source(split=split))


def file_names(data_config, split: str) -> list[str]:
  """The file name of every example of a split, by index (no image decoding).

  Args:
    data_config: config.data.
    split: split name.

  Returns:
    file_names[i] is the name of open_split(data_config, split)[i] (and of
    the eval batches' 'index' i).
  """
  if data_config.name == FAKE_NAME:
    source = FakeSource(_fake_split(split))
    return [f'fake_{split}_{index:04d}' for index in range(len(source))]
  tfds_builder = _tfds_builder(data_config)
  skip = tfds.decode.SkipDecoding()
  records_only = tfds_builder.as_data_source(
      split=split, decoders={'image': skip, 'label': skip})
  return [_text(records_only[index]['file_name'])
          for index in range(len(records_only))]


class TfdsSource:
  """A tfds array_record data source with pan_jax's field conventions."""

  def __init__(self, data_source):
    self._data_source = data_source

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._data_source[index]
    return {'image': record['image'],          # uint8 [H, W, 3]
            'label': record['label'][..., 0],  # uint8 [H, W]
            'file_name': _text(record['file_name'])}

  def __repr__(self):
    return f'TfdsSource({self._data_source!r})'


class FakeSource:
  """'fake': small synthetic examples rendered on the fly (no files)."""

  def __init__(self, split: str):
    self._split = split
    self._size, self._min_side, self._max_side = FAKE_SPLITS[split]

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._size:
      raise IndexError(f'index {index} out of range for {self._size} examples')
    rng = synthetic.example_rng(_FAKE_SEED, self._split, index)
    height, width = rng.integers(self._min_side, self._max_side + 1, 2)
    image, label = synthetic.render(rng, int(height), int(width))
    return {'image': image, 'label': label,
            'file_name': f'fake_{self._split}_{index:04d}'}

  def __repr__(self):
    return f'FakeSource({self._split!r})'


def dataset_dir(data_config) -> str:
  """The local directory of a prepared dataset (DATA/<name>/<version>).

  For a gs:// data_dir, the dataset's copy in config.data.cache_dir, made
  or checked once per process (builder.local_copy).

  Raises:
    FileNotFoundError: not prepared, with the command that prepares it.
  """
  # A config.data made by hand (tests, notebooks) may lack the field.
  cache_dir = (data_config.get('cache_dir') or
               defaults.get_config().data.cache_dir)
  key = (data_config.data_dir, data_config.name, cache_dir)
  if key in _LOCAL_COPIES:
    return _LOCAL_COPIES[key]
  path = builder.built_dir(data_config.data_dir, data_config.name)
  if path is None:
    dataset = (data_config.name if data_config.name in PREPARED_DATASETS
               else 'voc2012_aug|cityscapes|folder|synthetic')
    raise errors.MissingError(
        f'dataset {data_config.name!r} is not prepared in '
        f'{paths.absolute(data_config.data_dir)} (no '
        f'{data_config.name}/<version>/{builder.INFO_FILE}). Build it with: '
        f'python -m pan_jax.data.prepare --dataset={dataset} '
        f'--source_dir=SRC --data_dir={data_config.data_dir}')
  if paths.is_url(path):
    path = builder.local_copy(path, cache_dir)
    _LOCAL_COPIES[key] = path
  return path


def _tfds_builder(data_config):
  return tfds.builder_from_directory(dataset_dir(data_config))


def _fake_split(split: str) -> str:
  if split not in FAKE_SPLITS:
    raise errors.ConfigError(f"dataset 'fake' has no split {split!r}; it has "
                     f'{sorted(FAKE_SPLITS)}')
  return split


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)
