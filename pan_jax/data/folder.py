"""Any image / mask folder ('folder'): how users bring their own data.

Expected under SRC:
  images/<split>/<stem>.{jpg,jpeg,png}   RGB (grayscale, CMYK, RGBA converted)
  labels/<split>/<stem>.png              8-bit class ids (grayscale or palette)
for any split names (e.g. train, val). Label values are 0..num_classes-1 or
the ignore value (any value >= num_classes, e.g. 255 or 11), which becomes 255
inside pan_jax so one convention runs through the system.
"""

import os
from typing import Optional, Sequence

from pan_jax import errors
from pan_jax.data import builder
from pan_jax.data import records
from pan_jax.data import voc

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def scan(source_dir: str, *, num_classes: int, ignore_label: int = 255,
         class_names: Optional[Sequence[str]] = None,
         skip_bad: bool = False) -> builder.DatasetSpec:
  """Lists the examples of every split folder.

  Args:
    source_dir: SRC, holding images/ and labels/.
    num_classes: classes 0..num_classes-1 (at most 255).
    ignore_label: the raw value meaning "ignore" (>= num_classes, < 256).
    class_names: one per class; default 'class_0', 'class_1', ...
    skip_bad: record unpaired files in spec.bad instead of raising.

  Returns:
    The DatasetSpec.

  Raises:
    ConfigError: inconsistent num_classes / ignore_label / class_names, or
      class names that are empty or not unique.
    records.BadInputError: missing folders, empty split, unpaired files.
  """
  if not 1 <= num_classes <= 255:
    raise errors.ConfigError(
        f'--num_classes={num_classes}; expected 1..255 (255 is the ignore '
        'value inside pan_jax)')
  if not num_classes <= ignore_label <= 255:
    raise errors.ConfigError(
        f'--ignore_label={ignore_label}; expected a value in '
        f'{num_classes}..255 (0..{num_classes - 1} are the class ids)')
  if class_names is None:
    class_names = [f'class_{i}' for i in range(num_classes)]
  check_class_names(class_names, num_classes)
  if not os.path.isdir(source_dir):
    raise records.BadInputError(source_dir, 'source folder not found',
                                skippable=False)
  image_root = os.path.join(source_dir, 'images')
  label_root = os.path.join(source_dir, 'labels')
  for root in (image_root, label_root):
    if not os.path.isdir(root):
      raise records.BadInputError(
          root, 'folder not found; expected images/<split>/<stem>.jpg|png and'
          ' labels/<split>/<stem>.png', skippable=False)
  split_names = sorted(d for d in os.listdir(image_root)
                       if os.path.isdir(os.path.join(image_root, d)))
  if not split_names:
    raise records.BadInputError(image_root, 'no split folders (e.g. train/, '
                                'val/) inside', skippable=False)
  bad = []  # _scan_split appends (path, problem) of skipped inputs.
  splits = {split: _scan_split(os.path.join(image_root, split),
                               os.path.join(label_root, split), skip_bad, bad)
            for split in split_names}
  return builder.DatasetSpec(
      name='folder', class_names=tuple(class_names),
      palette=voc.color_map(num_classes),
      mapping=records.LabelMapping.identity(num_classes, (ignore_label,)),
      splits=splits, source_dir=source_dir, bad=bad)


def check_class_names(class_names: Sequence[str], num_classes: int) -> None:
  """Raises ConfigError unless there are num_classes unique, non-empty names.

  Reports, metrics and TensorBoard key per-class scores by name: two classes
  with one name would show as one, an empty name as nothing.

  Args:
    class_names: --class_names, parsed.
    num_classes: --num_classes.
  """
  names = list(class_names)
  if len(names) != num_classes:
    raise errors.ConfigError(
        f'--class_names gives {len(names)} names for --num_classes='
        f'{num_classes}: {names}')
  empty = [k for k, name in enumerate(names) if not str(name).strip()]
  if empty:
    raise errors.ConfigError(
        f'--class_names: class {empty[0]} has an empty name ({names}); '
        'expected one non-empty name per class')
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise errors.ConfigError(
        f'--class_names: {", ".join(map(repr, repeated))} named more than '
        f'once ({names}); expected a different name for every class')


def _scan_split(image_dir, label_dir, skip_bad, bad):
  """Pairs images/<split>/<stem>.* with labels/<split>/<stem>.png."""
  if not os.path.isdir(label_dir):
    raise records.BadInputError(label_dir, 'label folder of this split not '
                                f'found (images are in {image_dir})',
                                skippable=False)
  images, problems = {}, []
  for entry in sorted(os.listdir(image_dir)):
    stem, extension = os.path.splitext(entry)
    if extension.lower() not in IMAGE_EXTENSIONS:
      continue
    if stem in images:
      problems.append((os.path.join(image_dir, entry),
                       f'two images with the stem {stem!r} ({images[stem]}); '
                       'expected one image per label'))
      continue
    images[stem] = os.path.join(image_dir, entry)
  labels = {os.path.splitext(entry)[0]: os.path.join(label_dir, entry)
            for entry in sorted(os.listdir(label_dir))
            if entry.lower().endswith('.png')}
  if not images:
    raise records.BadInputError(image_dir, 'empty split: no .jpg, .jpeg or '
                                '.png images', skippable=False)
  problems += (
      [(images[s], f'image without label (expected {label_dir}/{s}.png)')
       for s in sorted(set(images) - set(labels))] +
      [(labels[s], f'label without image (expected {image_dir}/{s}.jpg, '
        '.jpeg or .png)') for s in sorted(set(labels) - set(images))])
  if problems and not skip_bad:
    raise records.BadInputError(*problems[0])
  bad.extend(problems)
  return [records.ExampleFiles(stem, images[stem], labels[stem])
          for stem in sorted(set(images) & set(labels))]
