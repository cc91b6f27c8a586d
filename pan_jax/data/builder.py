"""The tfds builder that writes segmentation records as array_record.

One builder class serves every dataset: a `DatasetSpec` (made by voc.py,
cityscapes.py, folder.py) lists each split's source files, the class names,
palette and label mapping; the builder checks and encodes them
(records.make_record) and tfds writes them.

Without TensorFlow: DatasetInfo is defined directly (tfds'
`dataset_info_from_configs` wants a package layout) and images are given to
tfds as encoded bytes (encoding a numpy array needs TF).

Atomicity: tfds generates into `DATA/<name>/incomplete.<random>_<version>/` and
renames it to `DATA/<name>/<version>/` only when everything, dataset_info.json
included, is written; on an exception it deletes the temporary folder. A
killed build leaves only an `incomplete.*` folder, which `build` removes the
next time. A rebuild (overwrite) moves the old build aside and deletes it only
when the new one is complete. A dataset is "built" iff
`<version>/dataset_info.json` exists.

A gs:// data_dir (array_record writes local files only) is built in the
local cache and uploaded with dataset_info.json last (paths.upload_tree), so
that it is "built" there only once every other file is up and verified;
`local_copy` gives training and evaluation a verified copy in the local
cache, made once per host.
"""

import contextlib
import dataclasses
import fcntl
import multiprocessing
import os
import re
import shutil
import tempfile
from typing import Any, Optional

from absl import logging
from pan_jax import paths
from pan_jax import progress
from pan_jax.data import records
import tensorflow_datasets as tfds

VERSION = '1.0.0'
# Written last by tfds (and uploaded last): the dataset's commit marker.
INFO_FILE = 'dataset_info.json'
_VERSION_RE = re.compile(r'^\d+\.\d+\.\d+$')
# Prefix of a complete build moved aside while --overwrite rebuilds it.
_REPLACED = '.replaced.'


@dataclasses.dataclass
class DatasetSpec:
  """What to build.

  Attributes:
    name: tfds dataset name (the folder under DATA).
    class_names: one name per class id.
    palette: one (r, g, b) per class id, for colourised predictions.
    mapping: raw label values -> class ids / 255.
    splits: split name -> the examples' source files, in a fixed order.
    source_dir: where the files came from (kept in the metadata).
    notes: things the user must be told (e.g. a split that was not built).
    bad: (path, problem) of inputs already skipped while listing the files
      (only with skip_bad).
    build_args: the options it was made with besides source_dir (e.g.
      num_classes), kept in the metadata so that prepare can tell a rerun
      from a build of something else.
    unlabeled_splits: splits whose images have no ground truth (benchmark
      test splits; their labels are all 255); kept in the metadata.
  """
  name: str
  class_names: tuple[str, ...]
  palette: tuple[tuple[int, int, int], ...]
  mapping: records.LabelMapping
  splits: dict[str, list[records.ExampleFiles]]
  source_dir: str
  notes: list[str] = dataclasses.field(default_factory=list)
  bad: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  build_args: dict[str, Any] = dataclasses.field(default_factory=dict)
  unlabeled_splits: tuple[str, ...] = ()


def built_dir(data_dir: str, name: str) -> Optional[str]:
  """The newest complete build of dataset `name` under data_dir, or None.

  Args:
    data_dir: a local directory or a gs:// URL.
    name: the dataset.
  """
  root = os.path.join(data_dir, name)
  if not paths.isdir(root):
    return None
  versions = [v for v in paths.listdir(root) if _VERSION_RE.match(v) and
              paths.isfile(os.path.join(root, v, INFO_FILE))]
  if not versions:
    return None
  newest = max(versions, key=lambda v: tuple(int(x) for x in v.split('.')))
  return os.path.join(root, newest)


def local_copy(dataset_dir: str, cache_dir: str) -> str:
  """A local directory holding dataset_dir's files.

  Args:
    dataset_dir: a built dataset (built_dir's result), local or gs://.
    cache_dir: where a gs:// dataset is copied (config.data.cache_dir).

  Returns:
    dataset_dir itself if local; otherwise its copy under cache_dir,
    made or checked now (paths.mirror: verified, once per host, safe for
    concurrent processes).
  """
  if not paths.is_url(dataset_dir):
    return dataset_dir
  local = paths.cache_path(cache_dir, dataset_dir)
  if paths.mirror(dataset_dir, local, INFO_FILE):
    logging.info('Copied %s to %s.', dataset_dir, local)
  return local


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder,
                          skip_registration=True):
  """Writes {'image', 'label', 'file_name'} records for a DatasetSpec.

  Not registered with tfds (tfds has its own 'cityscapes'): datasets are read
  back with tfds.builder_from_directory (sources.py), which needs no class.
  """

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, spec: DatasetSpec, *, skip_bad: bool = False,
               num_workers: int = 0, **kwargs):
    self._spec = spec
    self._skip_bad = skip_bad
    self._num_workers = num_workers
    self.skipped = list(spec.bad)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    spec = self._spec
    metadata = tfds.core.MetadataDict(
        class_names=list(spec.class_names),
        palette=[list(colour) for colour in spec.palette],
        num_classes=len(spec.class_names),
        ignore_label=records.IGNORE_LABEL,
        source_dir=os.path.abspath(spec.source_dir),
        build_args=dict(spec.build_args),
        # split -> [max height, max width]: lets evaluation check its canvas
        # before it starts.
        max_image_size={},
        skipped=[],
        # Splits without ground truth: evaluation writes predictions only.
        unlabeled_splits=list(spec.unlabeled_splits),
    )
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f'{spec.name}: images with 8-bit class-id masks (255 = '
                     'ignore), built by pan_jax.data.prepare.'),
        features=tfds.features.FeaturesDict({
            # RGB JPEG or PNG bytes.
            'image': tfds.features.Image(shape=(None, None, 3)),
            # Class ids, 255 = ignore.
            'label': tfds.features.Image(shape=(None, None, 1),
                                         encoding_format='png'),
            'file_name': tfds.features.Text(),
        }),
        metadata=metadata,
    )

  # tfds prints "Downloading and preparing ..." and "... downloaded and
  # prepared"; nothing is downloaded here, so say what happens instead.
  def _log_download_bytes(self):
    counts = ', '.join(f'{split}: {len(examples)}'
                       for split, examples in self._spec.splits.items())
    print(f'Building {self.name} from {self._spec.source_dir} ({counts} '
          f'examples) in {self.data_dir} ...', flush=True)

  def _log_download_done(self):
    pass

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {split: self._generate_examples(split, examples)
            for split, examples in self._spec.splits.items()}

  def _generate_examples(self, split, examples):
    """Yields (file_name, record); checks every example (records.py)."""
    mapping = self._spec.mapping
    max_height, max_width, count = 0, 0, 0
    with _map_in_order(records.try_make_record, examples, mapping,
                       self._num_workers) as results, progress.Bar(
                           f'prepare {split}', len(examples),
                           'examples') as bar:
      for example, result in zip(examples, results):
        bar.update()
        if result[0] == 'bad':
          _, path, problem = result
          if not self._skip_bad:
            raise records.BadInputError(path, problem)
          self.skipped.append((path, problem))
          continue
        _, record, (height, width) = result
        max_height, max_width = max(max_height, height), max(max_width, width)
        count += 1
        yield example.file_name, record
    if not count:
      raise records.BadInputError(
          self._spec.source_dir, f'split {split!r} has no usable examples '
          f'({len(examples)} listed, all skipped as bad)', skippable=False)
    self.info.metadata['max_image_size'][split] = [max_height, max_width]
    self.info.metadata['skipped'] = [list(item) for item in self.skipped]


class _map_in_order:  # pylint: disable=invalid-name  (used like a function)
  """Context manager: fn(item, arg) for each item, in order, maybe in a pool."""

  def __init__(self, fn, items, arg, num_workers):
    self._fn, self._items, self._arg = fn, items, arg
    self._num_workers = num_workers
    self._pool = None

  def __enter__(self):
    if self._num_workers <= 1 or len(self._items) < 2 * self._num_workers:
      return (self._fn(item, self._arg) for item in self._items)
    # spawn: forking a process that has started threads (tfds, absl) is
    # unsafe.
    context = multiprocessing.get_context('spawn')
    self._pool = context.Pool(self._num_workers)
    return self._pool.imap(_Call(self._fn, self._arg), self._items,
                           chunksize=4)

  def __exit__(self, *exc):
    if self._pool is not None:
      self._pool.terminate()
      self._pool.join()


@dataclasses.dataclass(frozen=True)
class _Call:
  """Picklable fn(item, arg)."""
  fn: object
  arg: object

  def __call__(self, item):
    return self.fn(item, self.arg)


def build(spec: DatasetSpec, data_dir: str, *, skip_bad: bool = False,
          num_workers: int = 0, overwrite: bool = False,
          cache_dir: Optional[str] = None
          ) -> tuple[str, list[tuple[str, str]]]:
  """Builds `spec` into data_dir atomically (no-op if already built).

  Args:
    spec: what to build.
    data_dir: the tfds data_dir (DATA), local or gs://; the result is
      DATA/<name>/<version>.
    skip_bad: skip and count bad examples instead of failing on the first.
    num_workers: processes reading / checking / encoding source files (0 or
      1 = in this process).
    overwrite: replace a complete build. The old one is moved aside and
      deleted only once the new one is complete; if the build fails (or is
      killed: the next build puts it back) the old one stays.
    cache_dir: for a gs:// data_dir, the local directory the dataset is
      built in before it is uploaded (config.data.cache_dir). With
      overwrite, the bucket's old build stays until the new one is built
      locally, then it is deleted and the new one uploaded.

  Returns:
    (the dataset's directory, [(path, problem) of skipped inputs]).

  Raises:
    records.BadInputError: a bad input (without skip_bad) or an empty split.
  """
  if paths.is_url(data_dir):
    existing = built_dir(data_dir, spec.name)
    if existing and not overwrite:
      logging.info('%s is already built at %s', spec.name, existing)
      return existing, []
    if not cache_dir:
      raise ValueError(f'building into {data_dir} needs a local cache_dir')
    local, skipped = build(spec, paths.cache_path(cache_dir, data_dir),
                           skip_bad=skip_bad, num_workers=num_workers,
                           overwrite=overwrite)
    remote = os.path.join(data_dir, spec.name, os.path.basename(local))
    if existing:
      paths.rmtree(existing)  # No prefix rename on GCS: the old one goes.
    print(f'Uploading {local} to {remote} ...', flush=True)
    paths.upload_tree(local, remote, INFO_FILE)
    return remote, skipped
  os.makedirs(data_dir, exist_ok=True)
  root = os.path.join(data_dir, spec.name)
  with build_lock(data_dir, spec.name):
    _remove_incomplete(root)
    existing = built_dir(data_dir, spec.name)
    if existing and not overwrite:
      logging.info('%s is already built at %s', spec.name, existing)
      return existing, []
    replaced = None
    if existing:
      replaced = os.path.join(root,
                              _REPLACED + os.path.basename(existing))
      os.rename(existing, replaced)
    builder_cls = type(
        _camel_case(spec.name), (SegmentationBuilder,), {'name': spec.name},
        skip_registration=True)
    builder = builder_cls(spec, skip_bad=skip_bad, num_workers=num_workers,
                          data_dir=data_dir, file_format='array_record')
    # tfds' own bars have no total for the generation and print a
    # "Shuffling .../incomplete.<random>..." line per split; progress.Bar (in
    # _generate_examples) replaces them.
    tfds.display_progress_bar(False)
    try:
      # tfds insists on a download manager; keep its (empty) folders out of
      # DATA.
      with tempfile.TemporaryDirectory(prefix='pan_jax_dl_') as download_dir:
        builder.download_and_prepare(download_dir=download_dir)
    except BaseException:
      if replaced:
        os.rename(replaced, existing)
      raise
    finally:
      tfds.display_progress_bar(True)
    if replaced:
      shutil.rmtree(replaced, ignore_errors=True)
    return str(builder.data_path), builder.skipped


@contextlib.contextmanager
def build_lock(directory: str, name: str):
  """Serialises builds of one dataset (a second prepare waits, then no-ops).

  Without it, a second build would delete the first one's temporary folder;
  under it, any temporary folder is a leftover of a dead build. An flock is
  released by the kernel when its process dies, so a killed build never
  leaves a stale lock.

  Args:
    directory: where the lock file `.<name>.lock` goes (the data_dir, or
      the source folder synthetic data is generated in).
    name: the dataset.
  """
  with open(os.path.join(directory, f'.{name}.lock'), 'w') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f'another process is building {name} in {directory}; waiting '
            'for it ...', flush=True)
      fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_incomplete(root: str):
  """Cleans up after interrupted builds (call with the build lock held).

  Deletes tfds' incomplete.* folders, and puts back a build that an
  interrupted --overwrite had moved aside (or deletes it if a newer one
  completed).
  """
  if not os.path.isdir(root):
    return
  for entry in os.listdir(root):
    path = os.path.join(root, entry)
    if entry.startswith('incomplete.'):
      logging.info('removing the remains of an interrupted build: %s', path)
      shutil.rmtree(path, ignore_errors=True)
    elif entry.startswith(_REPLACED):
      version = os.path.join(root, entry[len(_REPLACED):])
      if os.path.exists(version):
        shutil.rmtree(path, ignore_errors=True)
      else:
        logging.warning('an interrupted rebuild left %s: restoring it as %s',
                        path, version)
        os.rename(path, version)


def _camel_case(name: str) -> str:
  return ''.join(part.capitalize() for part in name.split('_'))
