"""Augmentation and normalisation acting on image and mask together.

Typed grain transforms on examples {'image': uint8 [H, W, 3], 'label': uint8
[H, W], ...}. Geometry is applied to image and mask with the same mapping
(PIL's half-pixel convention): images are resampled bilinearly, masks with
nearest neighbour, so class ids are never blended. Image padding is the
ImageNet mean (0 after normalisation) and mask padding is 255 (ignored).
"""

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from pan_jax import errors
from pan_jax.data import records

# ImageNet statistics in 0..255 pixel units, RGB.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0
# What uint8 images are padded with before normalisation: the mean, rounded
# (within 0.006 of 0 after normalisation).
MEAN_PIXEL = tuple(int(round(float(v))) for v in IMAGENET_MEAN)

Example = dict[str, Any]


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] RGB -> float32 (x - mean) / std with ImageNet statistics."""
  image = np.ascontiguousarray(image)
  if image.ndim < 2:
    return (np.asarray(image, np.float32) - IMAGENET_MEAN) / IMAGENET_STD
  # x * (1/std) + (-mean/std) on [..., W*3] rows: numpy runs its inner loop
  # over whole rows instead of 3-vectors, which is ~8x faster.
  width = image.shape[-2]
  rows = image.reshape(image.shape[:-2] + (width * 3,))
  out = np.multiply(rows, np.tile(1.0 / IMAGENET_STD, width),
                    dtype=np.float32)
  out += np.tile(-IMAGENET_MEAN / IMAGENET_STD, width)
  return out.reshape(image.shape)


@dataclasses.dataclass(frozen=True)
class RandomScaleCrop(grain.transforms.RandomMap):
  """Random rescale, then a random crop_size x crop_size crop.

  The scale is uniform in [min_scale, max_scale] (the paper: 0.5 to 2). Where
  the scaled image is smaller than the crop, the crop extends past its bottom
  / right edge: the image is padded with the mean and the mask with 255. Only
  the cropped region is resampled (PIL resize with a source box), which gives
  the same pixels as resizing the whole image and cropping, at a fraction of
  the cost for large scales.
  """
  crop_size: int
  min_scale: float = 0.5
  max_scale: float = 2.0

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    image, label = element['image'], element['label']
    height, width = label.shape
    scale = rng.uniform(self.min_scale, self.max_scale)
    scaled_h = max(1, int(round(height * scale)))
    scaled_w = max(1, int(round(width * scale)))
    crop = self.crop_size
    top = int(rng.integers(0, max(scaled_h - crop, 0) + 1))
    left = int(rng.integers(0, max(scaled_w - crop, 0) + 1))
    # The part of the crop covered by the scaled image, in scaled pixels.
    valid_h, valid_w = min(crop, scaled_h - top), min(crop, scaled_w - left)
    # Its source box in original pixels (the exact scale of each axis).
    factor_y, factor_x = height / scaled_h, width / scaled_w
    box = (left * factor_x, top * factor_y, (left + valid_w) * factor_x,
           (top + valid_h) * factor_y)
    resized_image = np.asarray(Image.fromarray(image).resize(
        (valid_w, valid_h), Image.Resampling.BILINEAR, box=box))
    resized_label = np.asarray(Image.fromarray(label).resize(
        (valid_w, valid_h), Image.Resampling.NEAREST, box=box))
    if (valid_h, valid_w) == (crop, crop):  # no padding: the common case
      return dict(element, image=resized_image, label=resized_label)
    out_image = np.empty((crop, crop, 3), np.uint8)  # [crop, crop, 3]
    # One padded row, assigned to whole rows: much faster than broadcasting
    # a 3-vector over every pixel.
    pad_row = np.tile(np.asarray(MEAN_PIXEL, np.uint8), (crop, 1))  # [crop, 3]
    out_image[valid_h:] = pad_row
    out_image[:valid_h, valid_w:] = pad_row[valid_w:]
    out_image[:valid_h, :valid_w] = resized_image
    out_label = np.full((crop, crop), records.IGNORE_LABEL, np.uint8)
    out_label[:valid_h, :valid_w] = resized_label
    return dict(element, image=out_image, label=out_label)


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
  """Left-right flip of image and mask with the given probability."""
  probability: float = 0.5

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    if rng.random() >= self.probability:
      return element
    # PIL flips a contiguous copy twice as fast as numpy copies a [:, ::-1]
    # view; the contiguous result also keeps Normalize fast.
    return dict(element, image=_flip(element['image']),
                label=_flip(element['label']))


def _flip(array: np.ndarray) -> np.ndarray:
  return np.asarray(Image.fromarray(array).transpose(
      Image.Transpose.FLIP_LEFT_RIGHT))


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """image -> float32 normalized (ImageNet), label -> int32."""

  def map(self, element: Example) -> Example:
    return dict(element, image=normalize(element['image']),
                label=np.asarray(element['label'], np.int32))


@dataclasses.dataclass(frozen=True)
class PadToSize(grain.transforms.Map):
  """Pads image and mask at the bottom / right to (height, width).

  Run after Normalize: the image is padded with 0 (the mean) and the mask
  with 255. Adds 'image_size': int32 [2], the valid (height, width).
  An image larger than the canvas is an error naming it.
  """
  height: int
  width: int

  def map(self, element: Example) -> Example:
    image, label = element['image'], element['label']
    h, w = label.shape
    check_canvas_holds((h, w), (self.height, self.width),
                       f'image {element.get("file_name", "?")}')
    out_image = np.zeros((self.height, self.width, image.shape[-1]),
                         image.dtype)  # [Hc, Wc, 3]
    out_image[:h, :w] = image
    out_label = np.full((self.height, self.width), records.IGNORE_LABEL,
                        label.dtype)
    out_label[:h, :w] = label
    return dict(element, image=out_image, label=out_label,
                image_size=np.array([h, w], np.int32))


def check_canvas_holds(size: Sequence[int], canvas: Sequence[int],
                       what: str) -> None:
  """Raises ValueError unless an image of `size` fits the evaluation canvas.

  Evaluation pads every image to one canvas (config.eval.canvas_size) so that
  one compiled program serves the whole split; an image larger than the
  canvas cannot be evaluated.

  Args:
    size: the image's (height, width).
    canvas: config.eval.canvas_size (height, width).
    what: the image, for the message ('image x.png', 'the largest image of
      voc2012_aug/val').
  """
  height, width = (int(v) for v in size)
  canvas = tuple(int(v) for v in canvas)
  if height <= canvas[0] and width <= canvas[1]:
    return
  want = tuple(-(-max(side, limit) // 32) * 32
               for side, limit in zip((height, width), canvas))
  raise errors.ConfigError(
      f'config.eval.canvas_size={canvas} cannot hold {what} ({height}x{width},'
      ' HxW): it is larger than the evaluation canvas, and evaluation pads '
      'every image to the canvas (sliding windows too run over the padded '
      f'canvas). Set --config.eval.canvas_size="{want}" or more.')
