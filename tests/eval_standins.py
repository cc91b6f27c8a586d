"""Tiny stand-in models for the evaluation tests (not the real PAN).

They take the real model's call signature, `(images, train, image_sizes)`,
and mask padding the way the contract requires, so the inference plumbing can
be tested exactly and fast.
"""

import flax.linen as nn
import jax.numpy as jnp


def valid_mask(images, image_sizes):
  """float32 [B, H, W, 1]: 1 on each image's valid top-left region."""
  if image_sizes is None:
    return jnp.ones(images.shape[:3] + (1,), jnp.float32)
  rows = jnp.arange(images.shape[1])[None, :, None] < image_sizes[:, 0, None,
                                                                  None]
  cols = jnp.arange(images.shape[2])[None, None, :] < image_sizes[:, 1, None,
                                                                  None]
  return (rows & cols)[..., None].astype(jnp.float32)


class ConvPool(nn.Module):
  """3x3 convs + a global average pool, padding-invariant through masking.

  Zeroing everything outside the valid region before each SAME conv makes the
  canvas look exactly like the zero padding of the image at its own size.
  """
  num_classes: int = 5
  width: int = 8

  @nn.compact
  def __call__(self, images, train=False, image_sizes=None):
    del train
    mask = valid_mask(images, image_sizes)
    x = nn.relu(nn.Conv(self.width, (3, 3))(images * mask)) * mask
    pooled = jnp.sum(x, axis=(1, 2), keepdims=True) / jnp.sum(
        mask, axis=(1, 2), keepdims=True)  # [B, 1, 1, width]
    x = (x + nn.Dense(self.width)(pooled)) * mask
    return nn.Conv(self.num_classes, (3, 3))(x)


class Pointwise(nn.Module):
  """Per-pixel 1x1 layers: its prediction at a pixel depends on that pixel only.

  So it is flip-equivariant and sliding windows cannot change its output.
  """
  num_classes: int = 5
  width: int = 8

  @nn.compact
  def __call__(self, images, train=False, image_sizes=None):
    del train, image_sizes
    x = nn.relu(nn.Dense(self.width)(images))
    return nn.Dense(self.num_classes)(x)
