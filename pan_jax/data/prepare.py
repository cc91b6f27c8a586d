r"""Builds a dataset for pan_jax from local files (nothing is downloaded).

  python -m pan_jax.data.prepare --dataset=voc2012_aug --source_dir=SRC \
      --data_dir=DATA
  python -m pan_jax.data.prepare --dataset=cityscapes --source_dir=SRC ...
  python -m pan_jax.data.prepare --dataset=folder --source_dir=SRC \
      --data_dir=DATA --num_classes=3 --ignore_label=255 \
      --class_names=background,road,car
  python -m pan_jax.data.prepare --dataset=synthetic --source_dir=SRC \
      --data_dir=DATA [--seed=0 --num_train=2000 --num_val=300]

Writes the tfds dataset DATA/<dataset>/1.0.0 in array_record (read with
config.data.name=<dataset> and config.data.data_dir=DATA). Running it again is
a no-op; running it with another source or other options refuses, naming the
difference, unless --overwrite asks for a rebuild. The build is atomic: an
interrupted run leaves only a temporary folder that the next run removes.
DATA may be gs://BUCKET/dir: the dataset is built in --cache_dir
(array_record writes local files only) and uploaded, verified, with
dataset_info.json last, so that readers see it only once it is complete; run
it on one host. SRC is a local directory. A bad input stops the build with
an error naming the file and what was expected; --skip_bad skips such
examples and lists them at the end. See voc.py, cityscapes.py, folder.py and
synthetic.py for the expected source layouts.
"""

import os

from absl import app
from absl import flags
from absl import logging
from pan_jax import defaults
from pan_jax import errors
from pan_jax import paths
from pan_jax import runtime
from pan_jax.data import builder
from pan_jax.data import cityscapes
from pan_jax.data import folder
from pan_jax.data import synthetic
from pan_jax.data import voc
import tensorflow_datasets as tfds

DATASETS = ('voc2012_aug', 'cityscapes', 'folder', 'synthetic')


def prepare(dataset: str, source_dir: str, data_dir: str, *,
            skip_bad: bool = False, num_workers: int = 0, num_classes=None,
            ignore_label: int = 255, class_names=None, seed: int = 0,
            num_train: int = 2000, num_val: int = 300,
            overwrite: bool = False,
            cache_dir: str = defaults.get_config().data.cache_dir):
  """Builds `dataset` (the library form of the command line).

  Args:
    dataset: one of DATASETS.
    source_dir: the source files (see the dataset's module).
    data_dir: tfds data_dir to write to.
    skip_bad: skip bad examples instead of failing.
    num_workers: processes reading the source files.
    num_classes, ignore_label, class_names: 'folder' only.
    seed, num_train, num_val: 'synthetic' only.
    overwrite: rebuild a dataset that is already built.
    cache_dir: where a dataset for a gs:// data_dir is built first.

  Returns:
    (dataset directory, [(path, problem) skipped], [notes for the user],
    already_built).

  Raises:
    records.BadInputError: a bad input (see records.py) without skip_bad.
    MismatchError: the dataset is already built in data_dir from another
      source or with other options (and overwrite is False).
    ConfigError, UsageError: inconsistent arguments.
  """
  if dataset not in DATASETS:
    raise errors.UsageError(f'unknown dataset {dataset!r}; expected one of '
                            f'{", ".join(DATASETS)}')
  if dataset == 'folder':
    if num_classes is None:
      raise errors.UsageError('--dataset=folder needs --num_classes')
    names = (_parse_class_names(class_names) or
             [f'class_{i}' for i in range(num_classes)])
    args = {'num_classes': num_classes, 'ignore_label': ignore_label,
            'class_names': names}
  elif dataset == 'synthetic':
    args = {'seed': seed, 'num_train': num_train, 'num_val': num_val}
  else:
    args = {}
  existing = builder.built_dir(data_dir, dataset)
  if existing and not overwrite:
    info = tfds.builder_from_directory(existing).info
    _check_same_build(existing, info.metadata, source_dir, args)
    notes = []
    if (dataset == 'voc2012_aug' and 'train_aug' not in info.splits and
        source_dir and voc.find_sbd_root(source_dir)):
      notes.append(f'{existing} was built without SBD (no train_aug split). '
                   'Run again with --overwrite to add train_aug.')
    return existing, [], notes, True
  if dataset == 'voc2012_aug':
    spec = voc.scan(source_dir, skip_bad=skip_bad)
  elif dataset == 'cityscapes':
    spec = cityscapes.scan(source_dir, skip_bad=skip_bad)
  elif dataset == 'folder':
    spec = folder.scan(source_dir, num_classes=num_classes,
                       ignore_label=ignore_label,
                       class_names=args['class_names'], skip_bad=skip_bad)
  else:
    synthetic.write_voc_tree(source_dir, seed=seed, num_train=num_train,
                             num_val=num_val)
    spec = voc.scan(source_dir, name='synthetic',
                    class_names=synthetic.CLASS_NAMES, skip_bad=skip_bad)
  spec.build_args = args
  path, skipped = builder.build(spec, data_dir, skip_bad=skip_bad,
                                num_workers=num_workers, overwrite=overwrite,
                                cache_dir=cache_dir)
  return path, skipped, spec.notes, False


def _check_same_build(existing, metadata, source_dir, args):
  """Raises MismatchError unless `existing` was built from these inputs.

  Builds made before the options were recorded are compared on what their
  metadata holds (source_dir, num_classes, class_names).
  """
  stored = dict(metadata.get('build_args') or {})
  if not stored and 'num_classes' in args:
    stored = {'num_classes': metadata.get('num_classes'),
              'class_names': list(metadata.get('class_names') or [])}
  differences = []
  stored_source = metadata.get('source_dir')
  if source_dir and stored_source and (
      os.path.abspath(source_dir) != stored_source):
    differences.append(f'--source_dir: built from {stored_source}, now '
                       f'{os.path.abspath(source_dir)}')
  for key, value in args.items():
    if key in stored and _plain(stored[key]) != _plain(value):
      differences.append(f'--{key}: built with {_plain(stored[key])!r}, now '
                         f'{_plain(value)!r}')
  if differences:
    raise errors.MismatchError(
        f'{existing} is already built from other inputs: '
        f'{"; ".join(differences)}. Use another --data_dir, or --overwrite '
        'to rebuild it from these (the old build is kept until the new one '
        'is complete).')


def _plain(value):
  """JSON-read metadata and Python values compare alike (tuples as lists)."""
  return list(value) if isinstance(value, (list, tuple)) else value


def _parse_class_names(value):
  """'a,b,c' or a file with one name per line -> list, or None."""
  if not value:
    return None
  if paths.isfile(value):
    return [line.strip() for line in paths.read_text(value).splitlines()
            if line.strip()]
  return [name.strip() for name in value.split(',')]


def main(argv):
  """Builds --dataset from --source_dir into --data_dir."""
  flag_values = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flag_values.dataset or not flag_values.source_dir:
    raise app.UsageError('--dataset and --source_dir are required')
  logging.set_verbosity(logging.WARNING)
  # A bad input, an inconsistent flag or a dataset built from something else
  # is a UserError: runtime.run prints its message (exit status 1 or 2).
  path, skipped, notes, already = prepare(
      flag_values.dataset, flag_values.source_dir, flag_values.data_dir,
      skip_bad=flag_values.skip_bad, num_workers=flag_values.num_workers,
      num_classes=flag_values.num_classes,
      ignore_label=flag_values.ignore_label,
      class_names=flag_values.class_names, seed=flag_values.seed,
      num_train=flag_values.num_train, num_val=flag_values.num_val,
      overwrite=flag_values.overwrite, cache_dir=flag_values.cache_dir)
  if already:
    print(f'{flag_values.dataset} is already built at {path}: nothing to do.')
  else:
    print(f'\n{"rebuilt" if flag_values.overwrite else "built"} '
          f'{flag_values.dataset} at {path}')
  print(summary(path))
  if skipped:
    print(f'\nskipped {len(skipped)} bad input(s):')
    for bad_path, problem in skipped:
      print(f'  {bad_path}: {problem}')
  for note in notes:
    print(f'\nNOTE: {note}')
  return 0


def _define_flags() -> None:
  """The command's flags (defined when run as a program, as every command)."""
  flags.DEFINE_enum('dataset', None, DATASETS, 'Dataset to build.')
  flags.DEFINE_string(
      'source_dir', None, 'Folder holding the source files (for synthetic: '
      'where they are generated if absent).')
  flags.DEFINE_string(
      'data_dir', 'data', 'tfds data_dir the dataset is written to '
      '(config.data.data_dir), local or gs://.')
  flags.DEFINE_string(
      'cache_dir', defaults.get_config().data.cache_dir,
      'For a gs:// --data_dir: the local directory it is built in first '
      '(config.data.cache_dir).')
  flags.DEFINE_integer(
      'num_classes', None, 'folder: number of classes (ids 0..num_classes-1).')
  flags.DEFINE_integer(
      'ignore_label', 255, 'folder: label value to ignore (>= num_classes); '
      'stored as 255.')
  flags.DEFINE_string(
      'class_names', None, 'folder: comma-separated class names, or a text '
      'file with one name per line (default class_0, class_1, ...).')
  flags.DEFINE_bool(
      'skip_bad', False, 'Skip bad examples (listed at the end) instead of '
      'stopping at the first.')
  flags.DEFINE_bool(
      'overwrite', False, 'Rebuild the dataset if it is already built (the '
      'old build is replaced only when the new one is complete).')
  flags.DEFINE_integer('seed', 0, 'synthetic: dataset seed.')
  flags.DEFINE_integer('num_train', 2000, 'synthetic: training images.')
  flags.DEFINE_integer('num_val', 300, 'synthetic: validation images.')
  flags.DEFINE_integer(
      'num_workers', min(8, os.cpu_count() or 1),
      'Processes decoding and checking source files (0 or 1 = in process).')


def summary(path: str) -> str:
  """One line per split: examples and the largest image size."""
  info = tfds.builder_from_directory(path).info
  sizes = info.metadata.get('max_image_size', {})
  lines = [f'  {len(info.metadata["class_names"])} classes: '
           f'{", ".join(info.metadata["class_names"])}']
  for name, split in sorted(info.splits.items()):
    size = sizes.get(name)
    largest = f', largest image {size[0]}x{size[1]} (HxW)' if size else ''
    lines.append(f'  split {name}: {split.num_examples} examples{largest}')
  return '\n'.join(lines)


def cli() -> None:
  """The console script pan-jax-prepare (= python -m pan_jax.data.prepare)."""
  _define_flags()
  runtime.run(main)


if __name__ == '__main__':
  cli()
