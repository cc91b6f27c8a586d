"""Feature Pyramid Attention (paper section 3.1, Fig. 3): the centre on c5.

    main   = ConvBN1x1(c5)                                  # [B, h, w, C]
    x1     = ConvBN7(pool(c5));  x2 = ConvBN5(pool(x1));  x3 = ConvBN3(pool(x2))
    merged = lat1(x1) + up(lat2(x2) + up(lat3(x3)))         # U-shaped merge
    out    = main * up(merged)  (+ global branch)           # pixel attention

`kernels` lists the pyramid's kernels finest level first: (7, 5, 3) is Fig. 3
(7x7 on the level pooled once from c5); the text's "3x3, 5x5, 7x7 ...
respectively" read in level order would be (3, 5, 7). The pyramid's width
(`pyramid_channels`, the paper is silent) is C, 1 (smp: one map broadcast over
the channels) or any other N, then brought back to C by a 1x1 ConvBN
('expand') before the multiplication.

Ablations of Table 1 are attributes: pooling avg/max, kernels (7,5,3)/(3,3,3),
the global pooling branch added / concatenated / absent, and the SENet-style
channel attention that replaces the pyramid ('se'). With pooling='max',
pyramid_channels=1, use_bias=True, ceil_mode=False and align_corners=True the
block is smp's FPABlock exactly (parameter names map one to one:
down1 / down2 / down3 / lateral3 = smp down1 / down2 / down3[0] / down3[1],
lateral2 / lateral1 = smp conv2 / conv1, main = mid, glob = branch1).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pan_jax.models import layers

Array = jax.Array


class FPA(nn.Module):
  """Feature Pyramid Attention.

  Attributes:
    features: output channels (config.model.decoder_channels).
    norm: BatchNorm partial.
    attention: 'pyramid' (the paper) or 'se' (channel attention).
    pooling: 'avg' (the paper) or 'max' (smp) downsampling in the pyramid.
    kernels: conv kernels of the three levels, finest first.
    pyramid_channels: channels inside the pyramid: 0 = `features`, 1 (a
      spatial map broadcast over channels, smp), or any other width (then a
      1x1 ConvBN 'expand' maps the merged pyramid back to `features`).
    global_branch: 'add', 'concat' or 'none'.
    pooled_bn: BatchNorm on the pooled global vector.
    use_bias: conv biases (smp).
    ceil_mode: pyramid pooling keeps an odd last row/column (works down to a
      1x1 c5); False is PyTorch's default (smp) and needs c5 >= 8x8.
    align_corners: resize convention.
  """
  features: int
  norm: Any
  attention: str = 'pyramid'
  pooling: str = 'avg'
  kernels: Sequence[int] = (7, 5, 3)
  pyramid_channels: int = 0
  global_branch: str = 'add'
  pooled_bn: bool = True
  use_bias: bool = False
  ceil_mode: bool = True
  align_corners: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _conv(self, features, kernel, name, act=layers.relu, bn=True, bias=None):
    return layers.ConvBN(
        features, self.norm, kernel=kernel, act=act, use_bn=bn,
        use_bias=self.use_bias if bias is None else bias,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: Array, sizes: Optional[Array] = None) -> Array:
    """[B, h, w, C_in] c5 (+ valid sizes) -> [B, h, w, features]."""
    main = self._conv(self.features, 1, 'main')(x, sizes)

    if self.attention == 'pyramid':
      width = self.pyramid_channels or self.features
      if width < 0:
        raise ValueError(
            'model.fpa.pyramid_channels must be 0 (= decoder_channels), 1 or '
            f'a positive width, got {width}')
      k1, k2, k3 = self.kernels
      s1 = layers.down_sizes(sizes, self.ceil_mode)
      s2 = layers.down_sizes(s1, self.ceil_mode)
      s3 = layers.down_sizes(s2, self.ceil_mode)
      pool = lambda y, s: layers.pool2x2(y, s, self.pooling, self.ceil_mode)
      x1 = self._conv(width, k1, 'down1')(pool(x, sizes), s1)
      x2 = self._conv(width, k2, 'down2')(pool(x1, s1), s2)
      x3 = self._conv(width, k3, 'down3')(pool(x2, s2), s3)
      x3 = self._conv(width, k3, 'lateral3')(x3, s3)
      up = lambda y, ys, like, ls: layers.resize(
          y, like.shape[1:3], align_corners=self.align_corners,
          src_sizes=ys, dst_sizes=ls)
      x2 = self._conv(width, k2, 'lateral2')(x2, s2) + up(x3, s3, x2, s2)
      x1 = self._conv(width, k1, 'lateral1')(x1, s1) + up(x2, s2, x1, s1)
      if width not in (1, self.features):
        # Back to the main branch's width so the attention multiplies it
        # channel by channel.
        x1 = self._conv(self.features, 1, 'expand')(x1, s1)
      attention = up(x1, s1, main, sizes)
    elif self.attention == 'se':
      # Squeeze-and-excitation on c5, reduction 16, as SENet.
      pooled = layers.global_avg_pool(x, sizes)
      hidden = max(1, x.shape[-1] // 16)
      attention = self._conv(hidden, 1, 'se_reduce', bn=False, bias=True)(
          pooled)
      attention = self._conv(self.features, 1, 'se_expand', act=nn.sigmoid,
                             bn=False, bias=True)(attention)
    else:
      raise ValueError(f"model.fpa.attention must be 'pyramid' or 'se', "
                       f'got {self.attention!r}')
    out = main * attention

    if self.global_branch != 'none':
      pooled = layers.global_avg_pool(x, sizes)  # [B, 1, 1, C_in]
      glob = self._conv(self.features, 1, 'glob', bn=self.pooled_bn,
                        bias=self.use_bias or not self.pooled_bn)(pooled)
      glob = jnp.broadcast_to(glob, out.shape)
      if self.global_branch == 'add':
        out = out + glob
      elif self.global_branch == 'concat':
        out = self._conv(self.features, 1, 'fuse')(
            jnp.concatenate([out, glob], axis=-1), sizes)
      else:
        raise ValueError("model.fpa.global_branch must be 'add', 'concat' or "
                         f"'none', got {self.global_branch!r}")
    return layers.mask_invalid(out, sizes)
