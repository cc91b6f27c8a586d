"""Global Attention Upsample (paper section 3.2, Fig. 4), one decoder stage.

    low  = ConvBN3x3(low_level)                         # reduce channels
    gate = act(BN(Conv1x1(global_avg_pool(high))))      # [B, 1, 1, C]
    out  = up(high) + low * gate

The high-level features' global context weights the low-level features; the
result is added to the upsampled high-level features. Table 3's ablations are
attributes: low-level kernel 3 / 1 and the global context on / off. With
gate=sigmoid, use_bias=True and align_corners=True it is smp's GAUBlock
(low = smp conv2, context = smp conv1[1]).
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pan_jax.models import layers

Array = jax.Array


class GAU(nn.Module):
  """Global Attention Upsample.

  Attributes:
    features: channels (must equal the high-level input's channels).
    norm: BatchNorm partial.
    low_level_kernel: 3 (the paper) or 1.
    global_context: weight low-level features by the global context.
    gate: nonlinearity after the context's BN (relu in the paper, sigmoid in
      smp).
    pooled_bn: BatchNorm on the pooled context vector.
    use_bias: conv biases (smp).
    align_corners: resize convention.
  """
  features: int
  norm: Any
  low_level_kernel: int = 3
  global_context: bool = True
  gate: Callable[[Array], Array] = nn.relu
  pooled_bn: bool = True
  use_bias: bool = False
  align_corners: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, low: Array, high: Array,
               low_sizes: Optional[Array] = None,
               high_sizes: Optional[Array] = None) -> Array:
    """Fuses [B, h, w, C_low] low-level and [B, h', w', C] high-level maps.

    Returns:
      [B, h, w, features] at the low-level resolution.
    """
    up = layers.resize(high, low.shape[1:3], align_corners=self.align_corners,
                       src_sizes=high_sizes, dst_sizes=low_sizes)
    x = layers.ConvBN(self.features, self.norm, kernel=self.low_level_kernel,
                      use_bias=self.use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name='low')(low, low_sizes)
    if self.global_context:
      pooled = layers.global_avg_pool(high, high_sizes)  # [B, 1, 1, C]
      gate = layers.ConvBN(
          self.features, self.norm, kernel=1, act=self.gate,
          use_bn=self.pooled_bn, use_bias=self.use_bias or not self.pooled_bn,
          dtype=self.dtype, param_dtype=self.param_dtype,
          name='context')(pooled)
      x = x * gate
    return layers.mask_invalid(up + x, low_sizes)
