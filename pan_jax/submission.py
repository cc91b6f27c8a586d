"""Benchmark-server files: predictions in the formats the servers score.

`python -m pan_jax.evaluate --format=FORMAT` writes one PNG per image of the
split, at the image's own size, into OUT/FORMAT/, ready to archive:

  voc_test         OUT/voc_test/results/VOC2012/Segmentation/comp6_test_cls/
                   <image id>.png: palette PNGs of class ids with the VOC
                   colour map (the layout of the PASCAL VOC evaluation
                   server; comp6 = trained with data beyond VOC, as SBD and
                   ImageNet). Archive: cd OUT/voc_test && tar czf
                   ../voc_test.tgz results
  cityscapes_test  OUT/cityscapes_test/<city>_<seq>_<frame>_labelIds.png:
                   8-bit label ids (7 = road, 26 = car, ...; the server
                   scores label ids, not the 19 train ids the network
                   predicts). Archive: cd OUT/cityscapes_test && zip -q
                   ../cityscapes_test.zip *.png

Benchmark test splits have no labels; `python -m pan_jax.data.prepare` builds
them from the images alone (VOC: ImageSets/Segmentation/test.txt;
Cityscapes: leftImg8bit/test). On a labelled split the same files are
written and the split is scored as usual, which is how to check them with a
local evaluation script first.

`--save_predictions` uses the same writer for the network's own output
(format RAW): OUT/predictions/<file name>.png, 8-bit class ids as predicted
(train ids), to re-score or convert later.

Every process writes the images of its own share of the split (the names do
not collide), so OUT must be shared by the processes of a multi-host run.
"""

import os
from typing import Any, Dict, Mapping, Sequence

import numpy as np

from pan_jax import errors
from pan_jax import paths
from pan_jax import visualize
from pan_jax.data import cityscapes
from pan_jax.data import voc

FORMATS = ('voc_test', 'cityscapes_test')
# The raw class ids (evaluate --save_predictions); not a server's format.
RAW = 'predictions'
VOC_RESULTS_DIR = os.path.join('results', 'VOC2012', 'Segmentation',
                               'comp6_test_cls')
CITYSCAPES_SUFFIX = '_labelIds.png'
# The classes a format needs (the server's), in train-id order.
_CLASSES = {'voc_test': voc.CLASS_NAMES,
            'cityscapes_test': cityscapes.CLASS_NAMES}
_ARCHIVE = {
    'voc_test': 'cd {dir} && tar czf ../voc_test.tgz results',
    'cityscapes_test': 'cd {dir} && zip -q ../cityscapes_test.zip *.png',
}


def check_format(output_format: str, meta: Any) -> None:
  """Raises unless the network predicts the format's classes, in its order.

  Args:
    output_format: one of FORMATS.
    meta: the checkpoint's DatasetMeta (class_names).

  Raises:
    errors.UsageError: an unknown format, or other classes.
  """
  if output_format not in FORMATS:
    raise errors.UsageError(f'--format={output_format!r} is not one of '
                            f'{", ".join(FORMATS)}')
  expected = tuple(_CLASSES[output_format])
  if tuple(meta.class_names) != expected:
    raise errors.UsageError(
        f'--format={output_format} needs a network that predicts the '
        f'{len(expected)} classes of the benchmark ({", ".join(expected)}) '
        f'in that order; this checkpoint predicts {meta.num_classes} classes '
        f'of dataset {meta.name!r} ({", ".join(meta.class_names)})')


class Writer:
  """Writes the server file of every valid example of eval batches.

  Called as `writer(local_batch, predictions)` for each batch of this
  process (evaluate.evaluate_batches' `on_batch`).

  Attributes:
    directory: OUT/FORMAT, the folder to archive.
    count: files written by this process.
  """

  def __init__(self, output_format: str, output: str,
               file_names: Sequence[str]):
    """Prepares OUT/FORMAT.

    Args:
      output_format: one of FORMATS, or RAW.
      output: the evaluation's output directory OUT.
      file_names: the split's file names by example index (image id / stem).
    """
    if output_format not in FORMATS + (RAW,):
      raise errors.UsageError(f'--format={output_format!r} is not one of '
                              f'{", ".join(FORMATS)}')
    self._format = output_format
    self._file_names = list(file_names)
    self.directory = os.path.join(output, output_format)
    self.count = 0

  def path(self, index: int) -> str:
    """The file written for example `index` of the split."""
    stem = self._file_names[index]
    if self._format == 'voc_test':
      return os.path.join(self.directory, VOC_RESULTS_DIR, stem + '.png')
    if self._format == RAW:
      return os.path.join(self.directory, stem + '.png')
    return os.path.join(self.directory, stem + CITYSCAPES_SUFFIX)

  def __call__(self, local: Mapping[str, np.ndarray],
               predictions: np.ndarray) -> None:
    """Writes one file per valid example of a batch.

    Args:
      local: this process's batch ('valid', 'image_size', 'index').
      predictions: int [b, Hc, Wc] class ids of the same rows.
    """
    for b in np.flatnonzero(np.asarray(local['valid'])):
      height, width = (int(v) for v in local['image_size'][b])
      classes = np.asarray(predictions[b, :height, :width])
      path = self.path(int(local['index'][b]))
      if self._format == 'voc_test':
        visualize.save_png(path, classes.astype(np.uint8),
                           palette=voc.color_map(256))
      elif self._format == RAW:
        visualize.save_png(path, classes.astype(np.uint8))
      else:
        visualize.save_png(path, cityscapes.to_label_ids(classes))
      self.count += 1

  def summary(self) -> Dict[str, Any]:
    """What report.json records about the files, and how to archive them.

    (One file per image: report.json's num_images counts them over every
    process.)
    """
    directory = paths.absolute(self.directory)
    if self._format == RAW:
      return {'format': self._format, 'directory': directory}
    return {'format': self._format, 'directory': directory,
            'archive_command': _ARCHIVE[self._format].format(dir=directory)}
