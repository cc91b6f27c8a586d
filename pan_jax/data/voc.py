"""PASCAL VOC 2012 + SBD ('voc2012_aug'): what the source tree looks like.

Expected under SRC (the folder given to prepare):
  VOCdevkit/VOC2012/JPEGImages/<id>.jpg
  VOCdevkit/VOC2012/SegmentationClass/<id>.png   palette PNG, index = class id
  VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
  VOCdevkit/VOC2012/ImageSets/Segmentation/test.txt  optional (VOC2012 test
                                                  images, no labels)
  benchmark_RELEASE/dataset/cls/<id>.mat          SBD (optional)
  benchmark_RELEASE/dataset/{train,val}.txt
(`VOC2012/` directly under SRC, or SRC itself being VOC2012, also works.)

Splits: train, val, trainval (VOC lists) and, with SBD, train_aug = SBD train
+ SBD val + VOC train, minus VOC val (10,582 images on the real data). For an
id that has a VOC mask, the VOC mask is used (finer, with the 255 boundary
band), otherwise the SBD one; images come from VOC JPEGImages, else SBD img/.
With test.txt (the VOC2012 test tarball, extracted into the same VOCdevkit),
split test holds those images without labels (all 255), for the benchmark
server's files (`python -m pan_jax.evaluate --split=test --format=voc_test`).

The synthetic dataset (synthetic.py) is written in this layout and goes
through `scan` as well.
"""

import os
from typing import Optional, Sequence

from pan_jax.data import builder
from pan_jax.data import records

CLASS_NAMES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus',
    'car', 'cat', 'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike',
    'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
VOC_SPLITS = ('train', 'val', 'trainval')
# Built when ImageSets/Segmentation/test.txt exists; its images have no labels.
TEST_SPLIT = 'test'


def color_map(num_classes: int = 256) -> tuple[tuple[int, int, int], ...]:
  """The PASCAL VOC palette (class id -> (r, g, b)), bit-interleaved."""
  colours = []
  for index in range(num_classes):
    r = g = b = 0
    value = index
    for shift in range(7, -1, -1):
      r |= (value & 1) << shift
      g |= ((value >> 1) & 1) << shift
      b |= ((value >> 2) & 1) << shift
      value >>= 3
    colours.append((r, g, b))
  return tuple(colours)


def find_voc_root(source_dir: str) -> str:
  """Returns the VOC2012 folder inside source_dir (or raises BadInputError)."""
  if not os.path.isdir(source_dir):
    raise records.BadInputError(source_dir, 'source folder not found',
                                skippable=False)
  for candidate in (os.path.join(source_dir, 'VOCdevkit', 'VOC2012'),
                    os.path.join(source_dir, 'VOC2012'), source_dir):
    if os.path.isdir(os.path.join(candidate, 'JPEGImages')):
      return candidate
  raise records.BadInputError(
      source_dir, 'no VOC tree found; expected VOCdevkit/VOC2012 with '
      'JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/*.txt',
      skippable=False)


def find_sbd_root(source_dir: str) -> Optional[str]:
  """Returns SBD's benchmark_RELEASE/dataset folder, or None if absent."""
  for candidate in (os.path.join(source_dir, 'benchmark_RELEASE', 'dataset'),
                    os.path.join(source_dir, 'SBD', 'dataset'),
                    os.path.join(source_dir, 'dataset')):
    if os.path.isdir(os.path.join(candidate, 'cls')):
      return candidate
  return None


def read_id_list(path: str) -> list[str]:
  """Reads an image-id list (one id per line); error if missing or empty."""
  if not os.path.isfile(path):
    raise records.BadInputError(path, 'split list not found', skippable=False)
  with open(path) as f:
    ids = [line.split()[0] for line in f if line.strip()]
  if not ids:
    raise records.BadInputError(path, 'split list is empty; expected one '
                                'image id per line', skippable=False)
  return ids


def scan(source_dir: str, *, name: str = 'voc2012_aug',
         class_names: Sequence[str] = CLASS_NAMES,
         skip_bad: bool = False) -> builder.DatasetSpec:
  """Lists the examples of every split.

  Args:
    source_dir: SRC (see the module docstring).
    name: dataset name ('voc2012_aug', or 'synthetic' for the synthetic set).
    class_names: one per class id (VOC's 21 by default).
    skip_bad: record missing images / labels in spec.bad instead of raising.

  Returns:
    The DatasetSpec.

  Raises:
    records.BadInputError: missing folder, split list, image or label.
  """
  voc_root = find_voc_root(source_dir)
  image_dir = os.path.join(voc_root, 'JPEGImages')
  label_dir = os.path.join(voc_root, 'SegmentationClass')
  list_dir = os.path.join(voc_root, 'ImageSets', 'Segmentation')
  if not os.path.isdir(label_dir):
    raise records.BadInputError(label_dir, 'label folder not found; expected '
                                'palette PNGs of class ids', skippable=False)
  bad = []
  notes = []

  def voc_example(image_id: str) -> Optional[records.ExampleFiles]:
    image_path = os.path.join(image_dir, image_id + '.jpg')
    label_path = os.path.join(label_dir, image_id + '.png')
    problem = _missing(image_path, label_path)
    if problem:
      if not skip_bad:
        raise records.BadInputError(*problem)
      bad.append(problem)
      return None
    return records.ExampleFiles(image_id, image_path, label_path)

  lists = {split: read_id_list(os.path.join(list_dir, split + '.txt'))
           for split in ('train', 'val')}
  trainval_list = os.path.join(list_dir, 'trainval.txt')
  lists['trainval'] = (read_id_list(trainval_list)
                       if os.path.isfile(trainval_list)
                       else sorted(set(lists['train']) | set(lists['val'])))
  splits = {}
  for split in VOC_SPLITS:
    examples = [voc_example(image_id) for image_id in lists[split]]
    splits[split] = [e for e in examples if e is not None]
  unlabeled = ()
  test_list = os.path.join(list_dir, TEST_SPLIT + '.txt')
  if os.path.isfile(test_list):
    splits[TEST_SPLIT] = _test_examples(read_id_list(test_list), image_dir,
                                        skip_bad, bad)
    unlabeled = (TEST_SPLIT,)

  sbd_root = find_sbd_root(source_dir)
  if sbd_root is None:
    if name == 'voc2012_aug':
      notes.append(
          f'SBD not found under {source_dir} (expected benchmark_RELEASE/'
          'dataset/cls/*.mat with train.txt and val.txt): split train_aug '
          'was NOT built; only train, val and trainval. Add SBD, delete the '
          'built dataset folder and run prepare again to get train_aug.')
  else:
    splits['train_aug'] = _train_aug(voc_root, sbd_root, lists, skip_bad, bad)
  mapping = records.LabelMapping.identity(len(class_names))
  return builder.DatasetSpec(
      name=name, class_names=tuple(class_names),
      palette=color_map(len(class_names)), mapping=mapping, splits=splits,
      source_dir=source_dir, notes=notes, bad=bad, unlabeled_splits=unlabeled)


def _test_examples(ids, image_dir, skip_bad, bad):
  """The listed test images, without labels (label_format 'none')."""
  examples = []
  for image_id in ids:
    image_path = os.path.join(image_dir, image_id + '.jpg')
    if not os.path.isfile(image_path):
      problem = (image_path, 'image not found although the test list names '
                 'it; expected JPEGImages/<id>.jpg')
      if not skip_bad:
        raise records.BadInputError(*problem)
      bad.append(problem)
      continue
    examples.append(records.ExampleFiles(image_id, image_path, '', 'none'))
  return examples


def _train_aug(voc_root, sbd_root, lists, skip_bad, bad):
  """SBD train + val + VOC train, minus VOC val (the 10,582-image set)."""
  sbd_ids = (read_id_list(os.path.join(sbd_root, 'train.txt')) +
             read_id_list(os.path.join(sbd_root, 'val.txt')))
  val = set(lists['val'])
  ids = sorted((set(sbd_ids) | set(lists['train'])) - val)
  examples = []
  for image_id in ids:
    image_path = os.path.join(voc_root, 'JPEGImages', image_id + '.jpg')
    if not os.path.isfile(image_path):
      image_path = os.path.join(sbd_root, 'img', image_id + '.jpg')
    voc_label = os.path.join(voc_root, 'SegmentationClass', image_id + '.png')
    if os.path.isfile(voc_label):
      label_path, label_format = voc_label, 'png'
    else:
      label_path = os.path.join(sbd_root, 'cls', image_id + '.mat')
      label_format = 'sbd_mat'
    problem = _missing(image_path, label_path)
    if problem:
      if not skip_bad:
        raise records.BadInputError(*problem)
      bad.append(problem)
      continue
    examples.append(records.ExampleFiles(image_id, image_path, label_path,
                                         label_format))
  return examples


def _missing(image_path: str, label_path: str) -> Optional[tuple[str, str]]:
  """(path, problem) if the image or the label of a listed id is missing."""
  if not os.path.isfile(image_path):
    have_label = os.path.isfile(label_path)
    return image_path, ('image not found although a split list names it' +
                        (f' and its label {label_path} exists' if have_label
                         else '') + '; expected one image per label')
  if not os.path.isfile(label_path):
    return label_path, (f'label not found for image {image_path}; expected '
                        'one label per image')
  return None
