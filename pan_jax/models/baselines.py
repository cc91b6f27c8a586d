"""Centre blocks the paper compares FPA with (Table 2), and the plain FCN's.

* PPM: PSPNet's pyramid pooling module (adaptive average pools 1, 2, 3, 6).
* ASPP: DeepLabv3's atrous spatial pyramid pooling with image pooling.
* Projection: a 1x1 conv, the dilated-ResNet FCN baseline (Table 1, first row).

Each maps c5 [B, h, w, C_in] to [B, h, w, features] and respects valid sizes
like FPA does.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pan_jax.models import layers

Array = jax.Array


class Projection(nn.Module):
  """1x1 ConvBN-ReLU to `features` channels."""
  features: int
  norm: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, sizes: Optional[Array] = None) -> Array:
    return layers.ConvBN(self.features, self.norm, kernel=1, dtype=self.dtype,
                         param_dtype=self.param_dtype, name='proj')(x, sizes)


class PPM(nn.Module):
  """Pyramid pooling module (Zhao et al., 2017).

  Attributes:
    features: output channels.
    bins: adaptive pooling sizes.
    align_corners: resize convention (PSPNet's code uses True).
  """
  features: int
  norm: Any
  bins: Sequence[int] = (1, 2, 3, 6)
  align_corners: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, sizes: Optional[Array] = None) -> Array:
    branch_width = max(1, x.shape[-1] // len(self.bins))
    branches = [x]
    for b in self.bins:
      pooled = layers.adaptive_avg_pool(x, b, sizes)  # [B, b, b, C_in]
      pooled = layers.ConvBN(branch_width, self.norm, kernel=1,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f'pool{b}')(pooled)
      full = None if sizes is None else jnp.full_like(sizes, b)
      branches.append(layers.resize(pooled, x.shape[1:3],
                                    align_corners=self.align_corners,
                                    src_sizes=full, dst_sizes=sizes))
    return layers.ConvBN(self.features, self.norm, kernel=3, dtype=self.dtype,
                         param_dtype=self.param_dtype, name='bottleneck')(
                             jnp.concatenate(branches, axis=-1), sizes)


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling with image pooling (Chen et al., 2017).

  Attributes:
    features: output channels (also each branch's).
    rates: atrous rates of the 3x3 branches at the actual output stride.
  """
  features: int
  norm: Any
  rates: Sequence[int] = (6, 12, 18)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, sizes: Optional[Array] = None) -> Array:
    conv = lambda kernel, name, dilation=1: layers.ConvBN(
        self.features, self.norm, kernel=kernel, dilation=dilation,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    branches = [conv(1, 'conv1x1')(x, sizes)]
    for rate in self.rates:
      branches.append(conv(3, f'atrous{rate}', rate)(x, sizes))
    pooled = conv(1, 'image_pool')(layers.global_avg_pool(x, sizes))
    branches.append(layers.mask_invalid(
        jnp.broadcast_to(pooled, branches[0].shape), sizes))
    return conv(1, 'project')(jnp.concatenate(branches, axis=-1), sizes)
