"""Test-time inference on padded canvases: whole, multi-scale + flip, slide.

Every function here is pure, takes static shapes and traces under `jax.jit`;
the batch axis may be sharded over a mesh (nothing here reduces over it).

Images arrive padded to a fixed canvas `[B, Hc, Wc, 3]`, the valid part of
image b being the top-left `image_sizes[b] = (h, w)`. The model is called as
`apply_fn(images, image_sizes) -> logits` and masks the padding itself (see
`models`: global pooling and resizes ignore it), so the prediction on the
valid region equals the one on the image at its exact size. The functions
below keep that property through every transformation they add:

* multi-scale: the VALID REGION of each image is resized to
  `round(scale * (h, w))` and placed top-left on a canvas of
  `ceil(scale * (Hc, Wc))`; the probabilities come back from the scaled valid
  region to `(h, w)` the same way. `models.layers.resize` with per-image
  sizes builds each image's own bilinear weights over its valid pixels only,
  so padding never leaks into a border pixel (half-pixel centres, no
  antialiasing: PyTorch's `F.interpolate`, which MMSegmentation's test-time
  augmentation uses).
* flip: the valid region is mirrored in place (`flip_valid`); probabilities are
  mirrored back before averaging.
* slide: windows of `window_size` every `window_stride`, placed per image as
  MMSegmentation does (the last window of a row or column is shifted to end
  at the image's border); probabilities are averaged over overlapping windows.
  The number of windows is the canvas's (static); windows beyond a smaller
  image's own grid have zero weight. When one window covers the image, slide
  is whole-image inference on a window-sized canvas.
* minimum size: an input smaller than `options.min_size` on a side (a canvas
  at scale 0.5, a small window) is padded up to it before the model sees
  it, and the padding is cut off its output; so any scale works on any
  image, and where the input is large enough nothing changes.

Scores are softmax probabilities averaged over every (scale, flip) pair, all
at the image's size, as in MMSegmentation's aug_test and the paper's
multi-scale evaluation.

What the network sees around an image (`padding`, config.eval.padding) is a
protocol choice, and it changes the numbers (a network trained on mean-padded
crops reacts to padding):
* 'exact' (default): everything above; the network is told each input's
  valid size and the prediction is that of the image alone.
* 'divisor': every network input (the image, a scaled or flipped copy, a
  window) is padded bottom/right to a multiple of `size_divisor` with the
  training pad value (the mean colour: 0 after normalisation) and the network
  sees that padding; the outputs are cropped back to the valid region. This
  is MMSegmentation's `size_divisor` and what smp users do (its encoders need
  multiples of 32).
* 'crop': as 'divisor', but each input is first padded to at least
  `window_size` (the training crop in the recipes): the PSPNet and DeepLab
  evaluation code pad every image (or window) to the crop.
"""

import dataclasses
import math
from typing import Callable, Tuple

import jax
import jax.numpy as jnp

from pan_jax import errors
from pan_jax.models import layers

# apply_fn(images [B, H, W, 3] float32, image_sizes [B, 2] int32)
#   -> logits [B, H, W, K] float32.
ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]

MODES = ('whole', 'slide')
PADDINGS = ('exact', 'divisor', 'crop')


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  """How predictions are made (static: one compiled program per value).

  Attributes:
    mode: 'whole' (the canvas at once) or 'slide' (overlapping windows).
    scales: test-time scales; (1.0,) is single-scale.
    flip: also run the horizontally mirrored images.
    window_size: sliding-window (height, width).
    window_stride: sliding-window stride (height, width), at most the window.
    padding: 'exact', 'divisor' or 'crop' (see the module docstring).
    size_divisor: the multiple of padding 'divisor' and 'crop'.
    min_size: the smallest side the model accepts (models.min_input_size);
      a smaller input (a canvas at scale 0.5, a window) is padded up to it.
      Not a config.eval field: the caller gives it.
  """
  mode: str = 'whole'
  scales: Tuple[float, ...] = (1.0,)
  flip: bool = False
  window_size: Tuple[int, int] = (512, 512)
  window_stride: Tuple[int, int] = (341, 341)
  padding: str = 'exact'
  size_divisor: int = 32
  min_size: int = 1

  def __post_init__(self):
    # Configs read back from JSON hold lists; keep the dataclass hashable.
    object.__setattr__(self, 'scales', tuple(float(s) for s in self.scales))
    object.__setattr__(self, 'window_size',
                       tuple(int(s) for s in self.window_size))
    object.__setattr__(self, 'window_stride',
                       tuple(int(s) for s in self.window_stride))
    object.__setattr__(self, 'size_divisor', int(self.size_divisor))
    if self.mode not in MODES:
      raise errors.ConfigError(
          f'eval mode {self.mode!r} is not one of {MODES}')
    if self.padding not in PADDINGS:
      raise errors.ConfigError(
          f'config.eval.padding={self.padding!r} is not one of '
          f'{", ".join(PADDINGS)}')
    if self.size_divisor < 1:
      raise errors.ConfigError('config.eval.size_divisor must be >= 1, got '
                               f'{self.size_divisor}')
    if not self.scales or any(s <= 0 for s in self.scales):
      raise errors.ConfigError(
          f'eval scales must be positive, got {self.scales}')
    if len(self.window_size) != 2 or min(self.window_size) < 1:
      raise errors.ConfigError(
          f'eval window_size must be (height, width) >= 1, got '
          f'{self.window_size}')
    if (len(self.window_stride) != 2 or min(self.window_stride) < 1 or
        any(s > w for s, w in zip(self.window_stride, self.window_size))):
      raise errors.ConfigError(
          f'eval window_stride must be (height, width) in [1, window_size '
          f'{self.window_size}] (a larger stride leaves pixels unseen), got '
          f'{self.window_stride}')

  @classmethod
  def from_config(cls, eval_config, **overrides) -> 'InferenceOptions':
    """Options from `config.eval`, with non-None `overrides` taking precedence.

    Args:
      eval_config: the `config.eval` ConfigDict (mode, scales, flip,
        window_size, window_stride, padding, size_divisor).
      **overrides: field values to use instead (None = keep the config's).

    Returns:
      InferenceOptions.
    """
    fields = {f.name: eval_config[f.name] for f in dataclasses.fields(cls)
              if f.name in eval_config}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**fields)


def predict_probs(apply_fn: ApplyFn, images: jax.Array,
                  image_sizes: jax.Array,
                  options: InferenceOptions) -> jax.Array:
  """Softmax probabilities averaged over scales and flips.

  Args:
    apply_fn: the model, `apply_fn(images, image_sizes) -> logits`.
    images: float32 [B, H, W, 3] canvases (normalized; padding anywhere right
      of / below the valid region).
    image_sizes: int [B, 2] valid (height, width) of each image.
    options: InferenceOptions.

  Returns:
    float32 [B, H, W, K] probabilities; only each image's valid region is
    meaningful (the rest is zero or arbitrary).
  """
  height, width = images.shape[1:3]
  image_sizes = image_sizes.astype(jnp.int32)
  apply_fn = _padded_to(apply_fn, options.min_size)
  base = _slide if options.mode == 'slide' else _whole
  if options.padding != 'exact':
    apply_fn = _padded(apply_fn, options)
  total = None
  for scale in options.scales:
    if scale == 1.0:
      scaled_images, scaled_sizes = images, image_sizes
    else:
      canvas = (math.ceil(height * scale), math.ceil(width * scale))
      scaled_sizes = scale_sizes(image_sizes, scale)
      scaled_images = layers.resize(images, canvas, src_sizes=image_sizes,
                                    dst_sizes=scaled_sizes)
    for flip in (False, True) if options.flip else (False,):
      inputs = (flip_valid(scaled_images, scaled_sizes[:, 1]) if flip
                else scaled_images)
      probs = base(apply_fn, inputs, scaled_sizes, options)
      if flip:
        probs = flip_valid(probs, scaled_sizes[:, 1])
      if scale != 1.0:
        probs = layers.resize(probs, (height, width), src_sizes=scaled_sizes,
                              dst_sizes=image_sizes)
      total = probs if total is None else total + probs
  count = len(options.scales) * (2 if options.flip else 1)
  return total if count == 1 else total / count


def predict(apply_fn: ApplyFn, images: jax.Array, image_sizes: jax.Array,
            options: InferenceOptions) -> jax.Array:
  """Predicted classes: argmax of `predict_probs`.

  Args:
    apply_fn: the model, `apply_fn(images, image_sizes) -> logits`.
    images: float32 [B, H, W, 3] canvases.
    image_sizes: int [B, 2] valid (height, width).
    options: InferenceOptions.

  Returns:
    int32 [B, H, W] class ids (meaningful on each valid region).
  """
  probs = predict_probs(apply_fn, images, image_sizes, options)
  return jnp.argmax(probs, axis=-1).astype(jnp.int32)


def scale_sizes(image_sizes: jax.Array, scale: float) -> jax.Array:
  """Valid sizes after scaling: round(scale * size), at least 1.

  Args:
    image_sizes: int [B, 2].
    scale: positive float.

  Returns:
    int32 [B, 2].
  """
  scaled = jnp.floor(image_sizes.astype(jnp.float32) * scale + 0.5)
  return jnp.maximum(scaled, 1).astype(jnp.int32)


def flip_valid(x: jax.Array, widths: jax.Array) -> jax.Array:
  """Mirrors each image's valid columns in place; padding columns stay put.

  Args:
    x: [B, H, W, C].
    widths: int [B] valid widths.

  Returns:
    [B, H, W, C]; column j < widths[b] of image b is column widths[b]-1-j.
  """
  column = jnp.arange(x.shape[2])
  source = jnp.where(column[None, :] < widths[:, None],
                     widths[:, None] - 1 - column[None, :],
                     column[None, :])  # [B, W]
  return jax.vmap(lambda image, index: jnp.take(image, index, axis=1))(
      x, source)


def _padded_to(apply_fn: ApplyFn, min_size: int) -> ApplyFn:
  """`apply_fn` for inputs of any size: a side below min_size is padded.

  The padding lies outside every valid region, which the model ignores, so
  where the input is at least min_size this changes nothing, and any scale
  works on any image.
  """
  def padded(images, image_sizes):
    height, width = images.shape[1:3]
    extra_h, extra_w = max(min_size - height, 0), max(min_size - width, 0)
    if not extra_h and not extra_w:
      return apply_fn(images, image_sizes)
    images = jnp.pad(images, ((0, 0), (0, extra_h), (0, extra_w), (0, 0)))
    return apply_fn(images, image_sizes)[:, :height, :width]
  return padded


def _round_up(value, multiple: int):
  """`value` rounded up to a multiple of `multiple` (int or int array)."""
  return -(-value // multiple) * multiple


def _padded(apply_fn: ApplyFn, options: InferenceOptions) -> ApplyFn:
  """`apply_fn` whose network sees each input padded (padding 'divisor'/'crop').

  Each input's valid region is kept and padded bottom/right with zeros (the
  mean colour of the training crops' padding, normalised) to a multiple of
  options.size_divisor, after padding to at least options.window_size for
  'crop'; the network is told the padded size, so it sees the padding. The
  logits come back at the input array's shape; those of the valid region are
  what the callers use.
  """
  divisor = options.size_divisor
  minimum = options.window_size if options.padding == 'crop' else (1, 1)

  def apply_padded(images: jax.Array, image_sizes: jax.Array) -> jax.Array:
    height, width = images.shape[1:3]
    sizes = _round_up(jnp.maximum(image_sizes, jnp.asarray(minimum,
                                                           jnp.int32)),
                      divisor)
    # The array must hold every padded size (static shapes).
    canvas_h = _round_up(max(height, minimum[0]), divisor)
    canvas_w = _round_up(max(width, minimum[1]), divisor)
    inputs = jnp.pad(layers.mask_invalid(images, image_sizes),
                     ((0, 0), (0, canvas_h - height), (0, canvas_w - width),
                      (0, 0)))
    return apply_fn(inputs, sizes)[:, :height, :width]

  return apply_padded


def _whole(apply_fn: ApplyFn, images: jax.Array, image_sizes: jax.Array,
           options: InferenceOptions) -> jax.Array:
  """Probabilities of the whole canvas in one call."""
  del options  # Whole-image inference has no options of its own.
  return jax.nn.softmax(apply_fn(images, image_sizes), axis=-1)


def num_windows(size, window: int, stride: int):
  """Windows along one axis (MMSegmentation's count); int or int array.

  Args:
    size: image size along the axis (Python int or int array).
    window: window size.
    stride: window stride.

  Returns:
    max(size - window + stride - 1, 0) // stride + 1, same type as `size`.
  """
  if isinstance(size, int):
    return max(size - window + stride - 1, 0) // stride + 1
  return jnp.maximum(size - window + stride - 1, 0) // stride + 1


def _slide(apply_fn: ApplyFn, images: jax.Array, image_sizes: jax.Array,
           options: InferenceOptions) -> jax.Array:
  """Probabilities averaged over overlapping windows (see module docstring)."""
  batch, height, width, _ = images.shape
  window_h, window_w = options.window_size
  stride_h, stride_w = options.window_stride
  # A canvas smaller than the window is padded so every window has one shape
  # (the padding is outside every valid region, hence masked by the model).
  canvas_h, canvas_w = max(height, window_h), max(width, window_w)
  images = jnp.pad(images, ((0, 0), (0, canvas_h - height),
                            (0, canvas_w - width), (0, 0)))
  rows = num_windows(canvas_h, window_h, stride_h)
  cols = num_windows(canvas_w, window_w, stride_w)
  heights, widths = image_sizes[:, 0], image_sizes[:, 1]  # [B]
  image_rows = num_windows(heights, window_h, stride_h)
  image_cols = num_windows(widths, window_w, stride_w)

  crop = jax.vmap(lambda image, top, left: jax.lax.dynamic_slice(
      image, (top, left, 0), (window_h, window_w, image.shape[-1])))

  def add_at(canvas, patch, top, left):
    start = (top, left, 0)
    return jax.lax.dynamic_update_slice(
        canvas,
        jax.lax.dynamic_slice(canvas, start, patch.shape) + patch, start)

  def window_probs(index):
    """Probabilities of window `index` of every image, and their weights."""
    row, col = index // cols, index % cols
    # MMSegmentation: the window starts at row * stride unless that runs past
    # the image, in which case it ends at the image's border (or starts at 0).
    top = jnp.maximum(jnp.minimum(row * stride_h + window_h, heights)
                      - window_h, 0)  # [B]
    left = jnp.maximum(jnp.minimum(col * stride_w + window_w, widths)
                       - window_w, 0)
    crop_sizes = jnp.stack([jnp.minimum(window_h, heights - top),
                            jnp.minimum(window_w, widths - left)], axis=1)
    probs = jax.nn.softmax(
        apply_fn(crop(images, top, left), crop_sizes), axis=-1)
    active = (row < image_rows) & (col < image_cols)  # [B]
    weight = (layers.valid_mask(crop_sizes, window_h, window_w) &
              active[:, None, None, None]).astype(jnp.float32)  # [B, h, w, 1]
    return probs * weight, weight, top, left

  def body(index, carry):
    total, count = carry
    probs, weight, top, left = window_probs(index)
    total = jax.vmap(add_at)(total, probs, top, left)
    count = jax.vmap(add_at)(count, weight, top, left)
    return total, count

  # A loop, not unrolled Python, keeps one copy of the model in the program.
  num_classes = jax.eval_shape(
      apply_fn,
      jax.ShapeDtypeStruct((batch, window_h, window_w, images.shape[-1]),
                           images.dtype),
      image_sizes).shape[-1]
  total = jnp.zeros((batch, canvas_h, canvas_w, num_classes), jnp.float32)
  count = jnp.zeros((batch, canvas_h, canvas_w, 1), jnp.float32)
  total, count = jax.lax.fori_loop(0, rows * cols, body, (total, count))
  # Padding pixels have count 0; every valid pixel is covered at least once.
  probs = total / jnp.maximum(count, 1.0)
  return probs[:, :height, :width]
