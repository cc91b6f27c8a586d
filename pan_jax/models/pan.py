"""The Pyramid Attention Network and the paper's comparison networks.

    c2, c3, c4, c5 = ResNet(images)          # strides 4, 8, 16, 16 at OS16
    x = centre(c5)                            # FPA (or PPM / ASPP / 1x1)
    x = GAU(c4, x); x = GAU(c3, x); x = GAU(c2, x)   # decoder='gau'
    logits = resize(classifier(x), image size)

With decoder='bilinear' the classifier runs on the centre's output and is
upsampled directly (the paper's "naive" decoder; with centre='none' this is the
dilated-ResNet FCN baseline).
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pan_jax.models import layers

Array = jax.Array
ModuleDef = Any


class PAN(nn.Module):
  """Segmentation network: backbone -> centre block -> decoder -> classifier.

  Attributes:
    num_classes: logits per pixel.
    backbone: ResNet partial (everything but `norm`).
    center: centre-block partial (everything but `norm`).
    gau: GAU partial, or None for the bilinear decoder.
    feature_strides: stride of c2..c5 (to derive valid sizes).
    min_size: smallest image side the network accepts.
    classifier_kernel: kernel of the classifier conv.
    align_corners: resize convention of the final upsampling.
    bn_momentum / bn_epsilon: BatchNorm hyper-parameters.
    dtype / param_dtype: compute / parameter dtype.
  """
  num_classes: int
  backbone: ModuleDef
  center: ModuleDef
  gau: Optional[ModuleDef]
  feature_strides: Any
  min_size: int
  classifier_kernel: int = 1
  align_corners: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check(self, images: Array, image_sizes: Optional[Array]):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
          'images must be [batch, height, width, 3] (NHWC, RGB), got shape '
          f'{tuple(images.shape)}')
    h, w = images.shape[1:3]
    # Not min(h, w): with symbolic sizes (serving export) only each side's
    # comparison with a constant is decidable.
    if h < self.min_size or w < self.min_size:
      raise ValueError(
          f'images of {h}x{w} are smaller than this model\'s minimum side of '
          f'{self.min_size} pixels (see models.min_input_size)')
    if image_sizes is not None and image_sizes.shape != (images.shape[0], 2):
      raise ValueError(f'image_sizes must be [batch, 2] (height, width), got '
                       f'shape {tuple(image_sizes.shape)}')

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False,
               image_sizes: Optional[Array] = None) -> Array:
    """Returns float32 logits [B, H, W, num_classes] at the input's size.

    Args:
      images: [B, H, W, 3] normalised images.
      train: batch statistics (and their update) instead of running averages.
      image_sizes: int32 [B, 2] valid (height, width) of each image when the
        batch is padded to a canvas (inference): padding then has no effect
        on the prediction inside the valid region, and logits outside it are 0.
    """
    self._check(images, image_sizes)
    if image_sizes is not None:
      image_sizes = jnp.asarray(image_sizes, jnp.int32)
      images = layers.mask_invalid(images, image_sizes)
    norm = functools.partial(
        layers.BatchNorm, use_running_average=not train,
        momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        dtype=self.dtype, param_dtype=self.param_dtype)
    sizes = {k: layers.sizes_at_stride(image_sizes, s)
             for k, s in self.feature_strides.items()}

    features = self.backbone(norm=norm, name='backbone')(images, image_sizes)
    x = self.center(norm=norm, name='center')(features['c5'], sizes['c5'])
    x_sizes = sizes['c5']
    if self.gau is not None:
      for level, name in (('c4', 'gau3'), ('c3', 'gau2'), ('c2', 'gau1')):
        x = self.gau(norm=norm, name=name)(features[level], x, sizes[level],
                                           x_sizes)
        x_sizes = sizes[level]
    logits = nn.Conv(
        self.num_classes, (self.classifier_kernel,) * 2,
        padding=layers.pad_for(self.classifier_kernel),
        dtype=self.dtype, param_dtype=self.param_dtype,
        name='classifier')(x)
    logits = logits.astype(jnp.float32)
    return layers.resize(logits, images.shape[1:3],
                         align_corners=self.align_corners,
                         src_sizes=x_sizes, dst_sizes=image_sizes)
