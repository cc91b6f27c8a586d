"""Tests of pan_jax.metrics against an independent NumPy computation."""

import jax
import numpy as np

from pan_jax import metrics

NUM_CLASSES = 6


def _numpy_scores(labels, predictions, num_classes):
  """Per-class IoU / accuracy straight from pixel sets, no confusion matrix."""
  keep = labels != 255
  labels, predictions = labels[keep], predictions[keep]
  iou, accuracy = [], []
  for k in range(num_classes):
    is_label, is_prediction = labels == k, predictions == k
    union = np.sum(is_label | is_prediction)
    iou.append(np.sum(is_label & is_prediction) / union if union else np.nan)
    accuracy.append(np.sum(is_label & is_prediction) / np.sum(is_label)
                    if np.sum(is_label) else np.nan)
  return {
      'miou': np.nanmean(iou),
      'pixel_accuracy': np.mean(labels == predictions),
      'mean_accuracy': np.nanmean(accuracy),
      'per_class_iou': np.array(iou),
      'per_class_accuracy': np.array(accuracy),
  }


def _random_batch(rng, shape):
  # Class 4 never occurs in the ground truth but is predicted; class 5 occurs
  # nowhere (NaN IoU, left out of the mean).
  labels = rng.choice([0, 1, 2, 3, 255], size=shape, p=[.3, .2, .2, .1, .2])
  predictions = rng.choice(5, size=shape)
  return labels.astype(np.int32), predictions.astype(np.int32)


def test_scores_equal_numpy():
  rng = np.random.default_rng(0)
  labels, predictions = _random_batch(rng, (3, 17, 23))
  confusion = jax.jit(metrics.confusion_matrix, static_argnums=2)(
      labels, predictions, NUM_CLASSES)
  assert confusion.shape == (NUM_CLASSES, NUM_CLASSES)
  assert int(confusion.sum()) == int(np.sum(labels != 255))
  got = metrics.scores(confusion)
  expected = _numpy_scores(labels, predictions, NUM_CLASSES)
  for name in ('miou', 'pixel_accuracy', 'mean_accuracy'):
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-12)
  for name in ('per_class_iou', 'per_class_accuracy'):
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-12)
  assert got['per_class_iou'][4] == 0 and np.isnan(got['per_class_iou'][5])
  assert np.isnan(got['per_class_accuracy'][4])


def test_invalid_examples_and_out_of_range_labels_are_not_counted():
  rng = np.random.default_rng(1)
  labels, predictions = _random_batch(rng, (4, 8, 8))
  labels[0, 0, :3] = [-1, NUM_CLASSES, 254]  # outside [0, K): not counted
  valid = np.array([True, False, True, False])
  confusion = metrics.confusion_matrix(labels, predictions, NUM_CLASSES,
                                       valid=valid)
  expected = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  for b in np.flatnonzero(valid):
    for t, p in zip(labels[b].ravel(), predictions[b].ravel()):
      if 0 <= t < NUM_CLASSES:
        expected[t, p] += 1
  np.testing.assert_array_equal(confusion, expected)


def test_confusion_matrices_add_up():
  rng = np.random.default_rng(2)
  labels, predictions = _random_batch(rng, (4, 8, 8))
  whole = metrics.confusion_matrix(labels, predictions, NUM_CLASSES)
  parts = sum(metrics.confusion_matrix(labels[i:i + 1], predictions[i:i + 1],
                                       NUM_CLASSES) for i in range(4))
  np.testing.assert_array_equal(whole, parts)


def test_empty_confusion_gives_nan_not_a_crash():
  got = metrics.scores(np.zeros((3, 3), np.int64))
  assert np.isnan(got['miou']) and np.isnan(got['pixel_accuracy'])
  assert np.isnan(got['per_class_iou']).all()
