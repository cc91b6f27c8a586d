"""Cityscapes ('cityscapes'): what the source tree looks like.

Expected under SRC:
  leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
for the splits train and val. Split test is built from its images alone
(leftImg8bit/test; the test labels are not public, gtFine/test is not read):
its labels are all 255, for the benchmark server's files
(`python -m pan_jax.evaluate --split=test --format=cityscapes_test`).

The 34 label ids are mapped to the 19 train ids of the benchmark; every other
id (and 255) becomes 255 (ignore). The table is the official one
(cityscapesScripts helpers/labels.py); `to_label_ids` maps predictions back
for the server, which scores label ids.
"""

import glob
import os

import numpy as np

from pan_jax.data import builder
from pan_jax.data import records

CLASS_NAMES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
    'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car',
    'truck', 'bus', 'train', 'motorcycle', 'bicycle')
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
    (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100),
    (0, 0, 230), (119, 11, 32))
# Label id -> train id for the 19 evaluated classes; ids 0..33 not listed
# here (unlabeled, ego vehicle, ..., caravan, trailer) are ignored.
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
NUM_LABEL_IDS = 34
# Train id -> label id (the inverse of LABEL_TO_TRAIN_ID).
TRAIN_ID_TO_LABEL_ID = tuple(sorted(LABEL_TO_TRAIN_ID,
                                    key=LABEL_TO_TRAIN_ID.get))
SPLITS = ('train', 'val', 'test')
# Splits without public labels: built from the images alone.
UNLABELED_SPLITS = ('test',)
_IMAGE_SUFFIX = '_leftImg8bit.png'
_LABEL_SUFFIX = '_gtFine_labelIds.png'


def label_mapping() -> records.LabelMapping:
  """labelIds (0..33, 255) -> train ids (0..18) or 255."""
  table = [-1] * 256
  for label_id in range(NUM_LABEL_IDS):
    table[label_id] = LABEL_TO_TRAIN_ID.get(label_id, records.IGNORE_LABEL)
  table[records.IGNORE_LABEL] = records.IGNORE_LABEL
  return records.LabelMapping(
      tuple(table), f'Cityscapes label ids 0..{NUM_LABEL_IDS - 1} (or 255)')


def to_label_ids(train_ids: np.ndarray) -> np.ndarray:
  """Train ids (0..18) -> Cityscapes label ids, e.g. for the test server.

  Args:
    train_ids: int [H, W] predicted train ids.

  Returns:
    uint8 [H, W] label ids (7 = road, 26 = car, ...).

  Raises:
    ValueError: a value that is not a train id.
  """
  train_ids = np.asarray(train_ids)
  if train_ids.size and (train_ids.min() < 0 or
                         train_ids.max() >= len(TRAIN_ID_TO_LABEL_ID)):
    raise ValueError(f'train ids must be in 0..{len(CLASS_NAMES) - 1}, got '
                     f'{train_ids.min()}..{train_ids.max()}')
  return np.asarray(TRAIN_ID_TO_LABEL_ID, np.uint8)[train_ids]


def scan(source_dir: str, *, skip_bad: bool = False) -> builder.DatasetSpec:
  """Lists the examples of the train, val and test splits (those present).

  Args:
    source_dir: SRC, holding leftImg8bit/ and gtFine/.
    skip_bad: record unpaired files in spec.bad instead of raising.

  Returns:
    The DatasetSpec.

  Raises:
    records.BadInputError: missing folders, empty split, unpaired files.
  """
  image_root = os.path.join(source_dir, 'leftImg8bit')
  label_root = os.path.join(source_dir, 'gtFine')
  if not os.path.isdir(source_dir):
    raise records.BadInputError(source_dir, 'source folder not found',
                                skippable=False)
  for root in (image_root, label_root):
    if not os.path.isdir(root):
      raise records.BadInputError(
          root, 'folder not found; expected leftImg8bit/<split>/<city>/'
          f'*{_IMAGE_SUFFIX} and gtFine/<split>/<city>/*{_LABEL_SUFFIX}',
          skippable=False)
  present = [s for s in SPLITS if os.path.isdir(os.path.join(image_root, s))]
  if not present:
    raise records.BadInputError(
        image_root, f'none of the split folders {", ".join(SPLITS)} found',
        skippable=False)
  bad = []  # _scan_split appends (path, problem) of skipped inputs.
  splits = {split: (_images_only(os.path.join(image_root, split))
                   if split in UNLABELED_SPLITS else
                   _scan_split(os.path.join(image_root, split),
                               os.path.join(label_root, split), skip_bad, bad))
            for split in present}
  return builder.DatasetSpec(
      name='cityscapes', class_names=CLASS_NAMES, palette=PALETTE,
      mapping=label_mapping(), splits=splits, source_dir=source_dir, bad=bad,
      unlabeled_splits=tuple(s for s in present if s in UNLABELED_SPLITS))


def _images_only(image_dir):
  """<stem>_leftImg8bit.png files of a split without labels."""
  images = _find(image_dir, _IMAGE_SUFFIX)
  if not images:
    raise records.BadInputError(
        image_dir, f'empty split: no <city>/*{_IMAGE_SUFFIX} files',
        skippable=False)
  return [records.ExampleFiles(stem, images[stem], '', 'none')
          for stem in sorted(images)]


def _find(directory, suffix):
  """{stem: path} of <directory>/<city>/<stem><suffix>."""
  return {os.path.basename(p)[:-len(suffix)]: p for p in glob.glob(
      os.path.join(directory, '*', '*' + suffix))}


def _scan_split(image_dir, label_dir, skip_bad, bad):
  """Pairs <stem>_leftImg8bit.png with <stem>_gtFine_labelIds.png."""
  if not os.path.isdir(label_dir):
    raise records.BadInputError(label_dir, 'label folder of this split not '
                                f'found; expected */*{_LABEL_SUFFIX}',
                                skippable=False)
  images = _find(image_dir, _IMAGE_SUFFIX)
  labels = _find(label_dir, _LABEL_SUFFIX)
  if not images:
    raise records.BadInputError(
        image_dir, f'empty split: no <city>/*{_IMAGE_SUFFIX} files',
        skippable=False)
  problems = (
      [(images[s], f'image without label (expected {label_dir}/<city>/{s}'
        f'{_LABEL_SUFFIX})') for s in sorted(set(images) - set(labels))] +
      [(labels[s], f'label without image (expected {image_dir}/<city>/{s}'
        f'{_IMAGE_SUFFIX})') for s in sorted(set(labels) - set(images))])
  if problems and not skip_bad:
    raise records.BadInputError(*problems[0])
  bad.extend(problems)
  return [records.ExampleFiles(stem, images[stem], labels[stem])
          for stem in sorted(set(images) & set(labels))]
