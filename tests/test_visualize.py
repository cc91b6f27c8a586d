"""Tests of pan_jax.visualize: overlays, the comparison panel, the confusion
matrix chart."""

import numpy as np
from PIL import Image

from pan_jax import visualize

NAMES = ('background', 'cat', 'dog', 'bird')
PALETTE = ((0, 0, 0), (128, 0, 0), (0, 128, 0), (0, 0, 128))


def _case():
  rng = np.random.default_rng(0)
  image = rng.integers(20, 230, (30, 40, 3)).astype(np.uint8)
  label = np.zeros((30, 40), np.int64)
  label[5:15, 5:20] = 1
  label[0, :] = 255
  prediction = np.zeros((30, 40), np.int64)
  prediction[5:15, 5:20] = 1
  prediction[20:25, 30:35] = 2
  return image, label, prediction


def test_overlay_keeps_background_and_marks_ignore():
  image, label, _ = _case()
  out = visualize.overlay(image, label, PALETTE,
                          transparent=visualize.background_ids(NAMES))
  assert visualize.background_ids(NAMES) == (0,)
  np.testing.assert_array_equal(out[20:], image[20:])  # Background: photo.
  assert (out[0] == visualize.IGNORE_COLOR).all()
  expected = np.round(0.5 * image[5:15, 5:20] + 0.5 * np.array(PALETTE[1]))
  np.testing.assert_array_equal(out[5:15, 5:20], expected)


def test_comparison_has_three_panes_captions_and_a_legend(tmp_path):
  image, label, prediction = _case()
  assert visualize.present_classes([label, prediction], 4) == [0, 1, 2]
  out = visualize.comparison(image, label, prediction, NAMES, PALETTE,
                             title='2007_000032')
  h, w = image.shape[:2]
  top = 16  # The caption strip.
  assert out.shape[1] == 3 * w + 2 * 4
  # The panes, unchanged, at their places.
  np.testing.assert_array_equal(out[top:top + h, :w], image)
  gt = visualize.overlay(image, label, PALETTE, transparent=(0,))
  np.testing.assert_array_equal(out[top:top + h, w + 4:2 * w + 4], gt)
  pred = visualize.overlay(image, prediction, PALETTE, transparent=(0,))
  np.testing.assert_array_equal(out[top:top + h, 2 * w + 8:], pred)
  # Captions: dark text on the white strip above each pane.
  for x in (0, w + 4, 2 * w + 8):
    assert (out[:top, x:x + w] < 100).any()
  # Legend below: a swatch of each class present (dog only predicted) and
  # of 'ignore', none of the absent bird.
  legend = out[top + h:].reshape(-1, 3)
  assert len(legend) > 0
  colors = {tuple(c) for c in legend}
  for color in (PALETTE[1], PALETTE[2], visualize.IGNORE_COLOR):
    assert tuple(color) in colors
  assert PALETTE[3] not in colors
  # Background's swatch is an empty outlined box (it is not coloured in the
  # panes), not a black square (as a class named otherwise gets).
  def squares(picture, color):
    area = (picture[top + h:] == color).all(axis=-1)
    windows = np.lib.stride_tricks.sliding_window_view(area, (8, 8))
    return windows.all(axis=(-1, -2)).sum()
  assert squares(out, PALETTE[0]) == 0 and squares(out, PALETTE[1]) > 0
  assert (out[top + h:] == 96).all(axis=-1).any()  # The box's outline.
  other = visualize.comparison(image, label, prediction, ('x',) + NAMES[1:],
                               PALETTE)
  assert squares(other, PALETTE[0]) > 0
  # Without labels: two panes.
  two = visualize.comparison(image, None, prediction, NAMES, PALETTE)
  assert two.shape[1] == 2 * w + 4


def test_legend_wraps_into_lines_as_wide_as_the_panel():
  image = np.zeros((8, 8, 3), np.uint8)
  legend = [(f'class {k}', (k, 0, 0)) for k in range(10)]
  out = visualize.captioned_panel([image], ['x'], legend)
  assert out.shape[1] == 8
  one = visualize.captioned_panel([image], ['x'], legend[:1])
  assert out.shape[0] > one.shape[0] > 16 + 8


def test_confusion_image_has_percentages_and_names(tmp_path):
  confusion = np.array([[90, 10, 0], [0, 0, 0], [50, 0, 50]])
  out = visualize.confusion_image(confusion, ['background', 'cat', 'dog'])
  path = tmp_path / 'c.png'
  visualize.save_png(str(path), out)
  assert Image.open(path).size == (out.shape[1], out.shape[0])
  # The 90% cell is dark with white digits; the empty row stays white.
  dark = np.array([8, 48, 107]) * 0.9 + 255 * 0.1
  ys, xs = np.nonzero(np.abs(out - dark).max(axis=-1) <= 2)
  assert len(ys) > 100
  cell = out[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  # Inside the 90% cell: light pixels of the digits written in it.
  assert (cell.min(axis=-1) > 200).sum() > 5
  # The 10% cell next to it has dark digits on a light ground.
  right = out[ys.min():ys.max() + 1, xs.max() + 3:xs.max() + cell.shape[1]]
  assert (right.max(axis=-1) < 120).sum() > 5
  # Longer class names on both axes: taller (vertical column names) and
  # the row labels push the matrix right.
  plain = visualize.confusion_image(confusion, ['a', 'b', 'c'])
  assert out.shape[0] > plain.shape[0]
  plain_x = np.nonzero(np.abs(plain - dark).max(axis=-1) <= 2)[1].min()
  assert xs.min() > plain_x
