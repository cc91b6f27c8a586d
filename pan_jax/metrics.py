"""Segmentation metrics: a confusion matrix on device, the scores on the host.

The confusion matrix is the one sufficient statistic of every score reported
here (mIoU, pixel accuracy, mean class accuracy, mDice, mFscore, per-class
values), and it adds up: summing the matrices of disjoint sets of pixels
gives the matrix of their union. So evaluation accumulates one `[K, K]`
integer matrix on device, batch after batch. Under `jax.jit` over a mesh the
batch is one global array, so the sum over devices and processes is part of
the compiled program (XLA inserts the all-reduce); nothing here knows how
many devices there are.

Rows are ground-truth classes, columns predicted classes:
`confusion[t, p]` = number of counted pixels of class `t` predicted as `p`.
A pixel is counted iff its label is in `[0, K)` (so 255, the ignore label, and
the padding of a canvas, which carries 255 too, are not) and its example is
valid (filler examples that pad the last batch are not).

Scores follow the PASCAL VOC / Cityscapes / MMSegmentation definitions:
  IoU_k        = C[k,k] / (sum_p C[k,p] + sum_t C[t,k] - C[k,k])
  accuracy_k   = C[k,k] / sum_p C[k,p]                (recall of class k)
  pixel acc.   = trace(C) / sum(C)
  Dice_k       = 2 C[k,k] / (sum_p C[k,p] + sum_t C[t,k])
  precision_k  = C[k,k] / sum_t C[t,k]                (NaN if never predicted)
  recall_k     = accuracy_k
  Fscore_k     = 2 precision_k recall_k / (precision_k + recall_k)
(MMSegmentation's mDice and mFscore with beta = 1. Dice_k and Fscore_k are
the same number where both are defined; they differ in the mean: a class in
the ground truth that is never predicted has Dice 0, which counts, and an
undefined (NaN) precision, hence Fscore, which does not.)
A class absent from both ground truth and predictions has IoU 0/0: it is NaN
and left out of the mean (the mean is over classes that occur), as MMSeg's
`nanmean` does. A class absent from the ground truth but predicted somewhere
has IoU 0 and counts. Likewise a class absent from the ground truth has a NaN
accuracy, left out of the mean class accuracy.
"""

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(labels: jax.Array,
                     predictions: jax.Array,
                     num_classes: int,
                     valid: Optional[jax.Array] = None) -> jax.Array:
  """Counts (label, prediction) pairs of one batch; jit-friendly.

  Args:
    labels: int [B, H, W] ground truth; values outside [0, num_classes) (the
      ignore label 255, canvas padding) are not counted.
    predictions: int [B, H, W] predicted classes in [0, num_classes).
    num_classes: K.
    valid: optional bool [B]; False marks a filler example whose pixels are
      not counted.

  Returns:
    int32 [K, K] matrix, rows ground truth, columns prediction.
  """
  labels = labels.astype(jnp.int32)
  predictions = predictions.astype(jnp.int32)
  counted = (labels >= 0) & (labels < num_classes)  # [B, H, W]
  if valid is not None:
    counted &= valid.astype(bool)[:, None, None]
  # Pixels not counted still need an in-range bin; their weight is zero.
  bins = jnp.where(counted, labels * num_classes + predictions, 0)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32)
  counts = counts.at[bins.reshape(-1)].add(
      counted.reshape(-1).astype(jnp.int32), mode='drop')
  return counts.reshape(num_classes, num_classes)


def scores(confusion: Any) -> Dict[str, Any]:
  """Computes the reported scores from a confusion matrix, on the host.

  Args:
    confusion: [K, K] integer array (rows ground truth, columns prediction).

  Returns:
    dict with float `miou`, `pixel_accuracy`, `mean_accuracy` (NaN when
    nothing was counted), `mdice`, `mfscore`, and float64 [K] arrays
    `per_class_iou`, `per_class_accuracy`, `per_class_dice`,
    `per_class_precision`, `per_class_recall`, `per_class_fscore` (NaN for
    classes without a defined value, see the module docstring).
  """
  confusion = np.asarray(confusion, dtype=np.int64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(
        f'confusion matrix must be square [K, K], got shape {confusion.shape}')
  true_positives = np.diag(confusion).astype(np.float64)
  per_label = confusion.sum(axis=1).astype(np.float64)  # ground-truth pixels
  per_prediction = confusion.sum(axis=0).astype(np.float64)
  union = per_label + per_prediction - true_positives
  total = float(confusion.sum())
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = np.where(union > 0, true_positives / union, np.nan)
    accuracy = np.where(per_label > 0, true_positives / per_label, np.nan)
    both = per_label + per_prediction
    dice = np.where(both > 0, 2 * true_positives / both, np.nan)
    precision = np.where(per_prediction > 0,
                         true_positives / per_prediction, np.nan)
    recall = accuracy
    # NaN stays NaN; 0 / 0 (both zero) is NaN too, as in MMSegmentation.
    fscore = 2 * precision * recall / (precision + recall)
  return {
      'miou': _nanmean(iou),
      'pixel_accuracy': (float(true_positives.sum()) / total
                         if total > 0 else float('nan')),
      'mean_accuracy': _nanmean(accuracy),
      'per_class_iou': iou,
      'per_class_accuracy': accuracy,
      'mdice': _nanmean(dice),
      'mfscore': _nanmean(fscore),
      'per_class_dice': dice,
      'per_class_precision': precision,
      'per_class_recall': recall,
      'per_class_fscore': fscore,
  }


def _nanmean(values: np.ndarray) -> float:
  """Mean of the non-NaN entries; NaN (without a warning) if there are none."""
  finite = values[~np.isnan(values)]
  return float(finite.mean()) if finite.size else float('nan')
