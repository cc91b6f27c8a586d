"""Building blocks shared by the backbone and the heads.

Two conventions run through every model file:

* Convolutions pad explicitly and symmetrically by `dilation * (k - 1) // 2`,
  as PyTorch does, not with XLA's 'SAME' (which pads (0, 1) for a stride-2 conv
  on an even input). This keeps PyTorch weights numerically equivalent and makes
  a feature pixel depend on the same image pixels whatever the image size.

* Valid regions. Evaluation pads every image to a fixed canvas so that one
  compiled function serves a whole split. The model then gets `sizes`, an int32
  [B, 2] array of each image's valid (height, width) at the current feature
  stride, with the valid region at the top left. Every layer that could see the
  padding (global pooling, resizes, pyramid pooling) uses these sizes, and
  feature maps are zeroed outside the valid region, so the padded image gets
  the same prediction as the image run at its exact size. With `sizes=None`
  (training, or unpadded inference) none of this costs anything.

`jax.image.resize` only has the half-pixel convention (align_corners=False);
`resize` here implements both conventions of PyTorch's bilinear
`F.interpolate`, for static sizes and for per-image valid sizes, as two small
interpolation matrices applied with einsum (which is also how
`jax.image.resize` works inside).
"""

from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
ModuleDef = Any

# He (Kaiming) normal, fan-out: torchvision's initialisation of ResNet convs.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv_general_dilated(lhs: Array, rhs: Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1,
                         precision=None) -> Array:
  """lax.conv_general_dilated for nn.Conv, fast when the kernel is larger.

  XLA's algebraic simplifier swaps the operands of a convolution whose kernel
  covers more pixels than its input (a 7x7 conv on a 5x5 map: the pyramid of
  FPA on small crops). On the CPU the swapped convolution, and even more its
  gradients, run 100-1000x below the machine's speed (the paper's FPA at
  160x160 crops spent 80% of the training step in 6 such convolutions).
  Such a convolution is done here as what it is, a matrix product of the
  kh*kw shifted copies of the (small) padded input with the kernel: the same
  sums, fast in both directions. Any other convolution goes to
  lax.conv_general_dilated unchanged.
  """
  rate = tuple(rhs_dilation or (1, 1))
  kh, kw, _, cout = rhs.shape
  simple = (lhs.ndim == 4 and tuple(window_strides) == (1, 1) and
            not any(d != 1 for d in (lhs_dilation or (1, 1))) and
            feature_group_count == 1 and not isinstance(padding, str) and
            dimension_numbers is not None and
            tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2) and
            tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1) and
            tuple(dimension_numbers.out_spec) == (0, 3, 1, 2))
  # A symbolic height or width (a serving export) cannot be compared with
  # the kernel: such a convolution stays as it is.
  concrete = all(isinstance(d, int) for d in lhs.shape[1:3])
  if (not simple or not concrete or
      kh * kw <= max(1, lhs.shape[1] * lhs.shape[2])):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision)
  (p0, p1), (q0, q1) = padding
  x = jnp.pad(lhs, ((0, 0), (p0, p1), (q0, q1), (0, 0)))
  out_h = x.shape[1] - rate[0] * (kh - 1)
  out_w = x.shape[2] - rate[1] * (kw - 1)
  shifted = [x[:, i * rate[0]:i * rate[0] + out_h,
               j * rate[1]:j * rate[1] + out_w]
             for i in range(kh) for j in range(kw)]
  # Channel order (i, j, c) is the row order of the HWIO kernel reshaped.
  patches = jnp.concatenate(shifted, axis=-1)
  return jnp.einsum('bhwk,ko->bhwo', patches, rhs.reshape(-1, cout),
                    precision=precision)


def pad_for(kernel: int, dilation: int = 1) -> Tuple[Tuple[int, int], ...]:
  """PyTorch-style symmetric padding of a square kernel."""
  p = dilation * (kernel - 1) // 2
  return ((p, p), (p, p))


def down_sizes(sizes: Optional[Array], ceil: bool = True) -> Optional[Array]:
  """Valid sizes after a stride-2 layer (ceil: padded convs; floor: pooling)."""
  if sizes is None:
    return None
  return (sizes + 1) // 2 if ceil else sizes // 2


def sizes_at_stride(image_sizes: Optional[Array], stride: int) -> Optional[Array]:
  """Valid sizes of a feature map at `stride` (ceil(h / stride) per axis)."""
  if image_sizes is None:
    return None
  return (image_sizes + stride - 1) // stride


def valid_mask(sizes: Array, height: int, width: int) -> Array:
  """[B, height, width, 1] bool: True inside each image's valid region."""
  rows = jnp.arange(height)[None, :] < sizes[:, 0:1]  # [B, H]
  cols = jnp.arange(width)[None, :] < sizes[:, 1:2]  # [B, W]
  return (rows[:, :, None] & cols[:, None, :])[..., None]


def mask_invalid(x: Array, sizes: Optional[Array], value: float = 0.) -> Array:
  """Sets `x` [B, H, W, C] to `value` outside the valid region."""
  if sizes is None:
    return x
  mask = valid_mask(sizes, x.shape[1], x.shape[2])
  return jnp.where(mask, x, jnp.asarray(value, x.dtype))


def global_avg_pool(x: Array, sizes: Optional[Array]) -> Array:
  """Mean over the valid region: [B, H, W, C] -> [B, 1, 1, C]."""
  if sizes is None:
    return jnp.mean(x, axis=(1, 2), keepdims=True)
  mask = valid_mask(sizes, x.shape[1], x.shape[2])
  total = jnp.sum(jnp.where(mask, x, 0), axis=(1, 2), keepdims=True)
  count = (sizes[:, 0] * sizes[:, 1]).astype(x.dtype)
  return total / jnp.maximum(count, 1)[:, None, None, None]


def pool2x2(x: Array, sizes: Optional[Array], kind: str, ceil: bool) -> Array:
  """2x2 stride-2 pooling over the valid region.

  Args:
    x: [B, H, W, C].
    sizes: valid sizes of `x`, or None.
    kind: 'avg' or 'max'.
    ceil: PyTorch's ceil_mode: an odd last row/column forms a window of its
      own (averaged over the pixels it has). False drops it (the default of
      torch.nn.MaxPool2d, smp's choice).

  Returns:
    [B, ceil(H/2) or floor(H/2), ..., C].
  """
  if kind not in ('avg', 'max'):
    raise ValueError(f"pooling must be 'avg' or 'max', got {kind!r}")
  h, w = x.shape[1], x.shape[2]
  if ceil:
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  else:
    x = x[:, :h - h % 2, :w - w % 2]
  hh, ww = x.shape[1], x.shape[2]
  if sizes is None:
    mask = jnp.zeros((1, hh, ww, 1), bool).at[:, :h, :w].set(True)
  else:
    mask = valid_mask(sizes, hh, ww)
  windows = (x.shape[0], hh // 2, 2, ww // 2, 2, x.shape[3])
  mask = jnp.broadcast_to(mask, x.shape[:3] + (1,)).reshape(windows[:-1] + (1,))
  x = x.reshape(windows)
  if kind == 'max':
    out = jnp.max(jnp.where(mask, x, -jnp.inf), axis=(2, 4))
    out = jnp.where(jnp.isfinite(out), out, 0).astype(x.dtype)
  else:
    total = jnp.sum(jnp.where(mask, x, 0), axis=(2, 4))
    count = jnp.sum(mask, axis=(2, 4)).astype(x.dtype)
    out = total / jnp.maximum(count, 1)
  # In floor mode a window straddling the valid border would be a valid pixel
  # on the canvas but does not exist at the exact size: zero it.
  return mask_invalid(out, down_sizes(sizes, ceil))


def _dim(size: Any) -> Any:
  """An int, or a symbolic dimension as is (jax.export with symbolic H, W)."""
  return size if jax.export.is_symbolic_dim(size) else int(size)


def _interp_weights(src: Array, in_valid: Array, in_size: int) -> Array:
  """Linear-interpolation matrix from clamped source coordinates.

  Args:
    src: [..., out] source coordinates.
    in_valid: [..., 1] number of valid input pixels.
    in_size: static input length.

  Returns:
    [..., out, in_size] weights; each row sums to 1.
  """
  src = jnp.clip(src, 0, in_valid - 1)
  i0 = jnp.floor(src)
  i1 = jnp.minimum(i0 + 1, in_valid - 1)
  w1 = src - i0
  grid = jnp.arange(in_size, dtype=src.dtype)
  return ((1 - w1)[..., None] * (grid == i0[..., None]) +
          w1[..., None] * (grid == i1[..., None]))


def _source_coords(out_size: int, in_valid: Array, out_valid: Array,
                   align_corners: bool) -> Array:
  """PyTorch's bilinear source coordinate of every output pixel."""
  y = jnp.arange(out_size, dtype=jnp.float32)
  if align_corners:
    ratio = (in_valid - 1) / jnp.maximum(out_valid - 1, 1)
    return jnp.where(out_valid > 1, y * ratio, 0.)
  return (y + 0.5) * in_valid / out_valid - 0.5


def _matrix(in_size: int, out_size: int, align_corners: bool,
            src_valid: Optional[Array], dst_valid: Optional[Array]) -> Array:
  """[out, in] (static) or [B, out, in] (per-image) interpolation matrix."""
  if src_valid is None:
    iv = jnp.asarray(in_size, jnp.float32)
    src = _source_coords(out_size, iv, jnp.asarray(out_size, jnp.float32),
                         align_corners)
    return _interp_weights(src, iv, in_size)
  iv = src_valid.astype(jnp.float32)[:, None]  # [B, 1]
  ov = dst_valid.astype(jnp.float32)[:, None]
  src = _source_coords(out_size, iv, ov, align_corners)  # [B, out]
  weights = _interp_weights(src, iv, in_size)
  rows = jnp.arange(out_size)[None, :, None] < dst_valid[:, None, None]
  return jnp.where(rows, weights, 0.)


def resize(x: Array, size: Sequence[int], *, align_corners: bool = False,
           src_sizes: Optional[Array] = None,
           dst_sizes: Optional[Array] = None) -> Array:
  """Bilinear resize with PyTorch's semantics (`F.interpolate`, antialias off).

  Args:
    x: [B, H, W, C].
    size: output (height, width).
    align_corners: PyTorch's flag; False is the half-pixel convention of
      `jax.image.resize`.
    src_sizes: [B, 2] valid sizes of `x` (top-left region), or None.
    dst_sizes: [B, 2] valid sizes of the output; required with `src_sizes`.
      The valid input region is resized onto the valid output region, exactly
      as if both were whole images; outside it the output is 0.

  Returns:
    [B, size[0], size[1], C] in x's dtype.
  """
  out_h, out_w = _dim(size[0]), _dim(size[1])
  in_h, in_w = x.shape[1], x.shape[2]
  if src_sizes is None and (in_h, in_w) == (out_h, out_w):
    return x
  if (src_sizes is None) != (dst_sizes is None):
    raise ValueError('resize needs both src_sizes and dst_sizes, or neither')
  sv = (None, None) if src_sizes is None else (src_sizes[:, 0], src_sizes[:, 1])
  dv = (None, None) if dst_sizes is None else (dst_sizes[:, 0], dst_sizes[:, 1])
  mh = _matrix(in_h, out_h, align_corners, sv[0], dv[0]).astype(x.dtype)
  mw = _matrix(in_w, out_w, align_corners, sv[1], dv[1]).astype(x.dtype)
  # Float32 resizes must stay float32 on GPUs/TPUs too (no TF32/bf16 passes).
  precision = (jax.lax.Precision.HIGHEST if x.dtype == jnp.float32
               else jax.lax.Precision.DEFAULT)
  if src_sizes is None:
    x = jnp.einsum('oh,bhwc->bowc', mh, x, precision=precision)
    return jnp.einsum('pw,bowc->bopc', mw, x, precision=precision)
  x = jnp.einsum('boh,bhwc->bowc', mh, x, precision=precision)
  return jnp.einsum('bpw,bowc->bopc', mw, x, precision=precision)


def adaptive_avg_pool(x: Array, bins: int, sizes: Optional[Array]) -> Array:
  """PyTorch's AdaptiveAvgPool2d(bins) over the valid region.

  Bin i of an axis of valid length n averages [floor(i*n/bins),
  ceil((i+1)*n/bins)), as PyTorch does.

  Args:
    x: [B, H, W, C].
    bins: output side.
    sizes: valid sizes of `x`, or None.

  Returns:
    [B, bins, bins, C].
  """

  def matrix(length, valid):
    # [B or 1, bins, length] averaging weights.
    n = (jnp.full((1,), length) if valid is None else valid)[:, None, None]
    i = jnp.arange(bins)[None, :, None]
    start = (i * n) // bins
    end = ((i + 1) * n + bins - 1) // bins
    grid = jnp.arange(length)[None, None, :]
    inside = (grid >= start) & (grid < end)
    return inside / jnp.maximum(end - start, 1)

  vh = None if sizes is None else sizes[:, 0]
  vw = None if sizes is None else sizes[:, 1]
  mh = matrix(x.shape[1], vh).astype(x.dtype)
  mw = matrix(x.shape[2], vw).astype(x.dtype)
  mh = jnp.broadcast_to(mh, (x.shape[0],) + mh.shape[1:])
  mw = jnp.broadcast_to(mw, (x.shape[0],) + mw.shape[1:])
  precision = (jax.lax.Precision.HIGHEST if x.dtype == jnp.float32
               else jax.lax.Precision.DEFAULT)
  x = jnp.einsum('boh,bhwc->bowc', mh, x, precision=precision)
  return jnp.einsum('bpw,bowc->bopc', mw, x, precision=precision)


_BITS = np.arange(8, dtype=np.uint8)


def _pack(mask: Array) -> Array:
  """bool [..., C] -> uint8 [..., C / 8] (C % 8 == 0), one bit per element."""
  bits = mask.reshape(mask.shape[:-1] + (-1, 8)).astype(jnp.uint8) << _BITS
  return jnp.sum(bits, axis=-1, dtype=jnp.uint8)


def _unpack(packed: Array) -> Array:
  bits = (packed[..., None] >> _BITS) & 1
  return bits.reshape(packed.shape[:-1] + (-1,)).astype(bool)


@jax.custom_vjp
def relu(x: Array) -> Array:
  """ReLU whose backward pass keeps a 1-bit mask instead of its input.

  jax.nn.relu differentiates through `x > 0` of its input, so XLA keeps the
  whole float pre-activation alive from the forward to the backward pass.
  The same gradient (0 at x <= 0, as jax.nn.relu) comes from the mask packed
  8 channels a byte (a reduction, which XLA does not fuse into the backward
  pass; a plain bool mask it would recompute from x and keep x).
  """
  return jnp.maximum(x, 0)


def _relu_fwd(x):
  mask = x > 0
  return jnp.maximum(x, 0), (_pack(mask) if x.shape[-1] % 8 == 0 else mask)


def _relu_bwd(mask, g):
  if mask.dtype == jnp.uint8:
    mask = _unpack(mask)
  return (jnp.where(mask, g, jnp.zeros((), g.dtype)),)


relu.defvjp(_relu_fwd, _relu_bwd)


class BatchNorm(nn.Module):
  """flax.linen.BatchNorm (same variables and statistics), lighter to train.

  Training normalises as `x * a + b` with per-channel `a = scale /
  sqrt(var + eps)` and `b = bias - mean * a`. flax computes `(x - mean) *
  a + bias`, which makes autodiff keep the centred `x - mean` (a second
  copy of every BatchNorm input) for the backward pass; here only `x`
  itself is kept, as PyTorch does. Statistics are flax's: float32 mean and
  E[x^2] - E[x]^2 (clipped at 0), the biased variance in the running
  average. With running averages the formula is flax's unchanged.

  Attributes:
    use_running_average: normalise with the running statistics.
    momentum: decay of the running statistics.
    epsilon: added to the variance.
    dtype: output dtype (statistics are float32 at least).
    param_dtype: dtype of scale and bias.
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    stat_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda s: jnp.zeros(s, jnp.float32), (features,))
    ra_var = self.variable('batch_stats', 'var',
                           lambda s: jnp.ones(s, jnp.float32), (features,))
    scale = self.param('scale', nn.initializers.ones, (features,),
                       self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,),
                      self.param_dtype)
    out_dtype = self.dtype or jnp.result_type(x, scale, bias)
    if self.use_running_average:
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      return jnp.asarray((x - ra_mean.value) * mul + bias, out_dtype)
    xs = x.astype(stat_dtype)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xs, axes)
    var = jnp.maximum(0., jnp.mean(jnp.square(xs), axes) - jnp.square(mean))
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    a = jax.lax.rsqrt(var + self.epsilon) * scale
    b = bias - mean * a
    return jnp.asarray(xs * a + b, out_dtype)


class ConvBN(nn.Module):
  """Conv -> BatchNorm -> activation, zeroed outside the valid region.

  Attributes:
    features: output channels.
    kernel: square kernel size.
    stride: stride.
    dilation: dilation rate (padding follows it).
    use_bias: conv bias (smp's head convs have one; ResNets do not).
    use_bn: False gives conv (+bias) -> activation.
    act: activation applied last (None for none).
    norm: BatchNorm partial (use_running_average etc. already set).
    dtype / param_dtype: compute and parameter dtypes.
  """
  features: int
  norm: ModuleDef
  kernel: int = 1
  stride: int = 1
  dilation: int = 1
  use_bias: bool = False
  use_bn: bool = True
  act: Optional[Callable[[Array], Array]] = relu
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, sizes: Optional[Array] = None) -> Array:
    x = nn.Conv(
        self.features, (self.kernel, self.kernel),
        strides=(self.stride, self.stride),
        conv_general_dilated=conv_general_dilated,
        padding=pad_for(self.kernel, self.dilation),
        kernel_dilation=(self.dilation, self.dilation),
        use_bias=self.use_bias, kernel_init=conv_init,
        dtype=self.dtype, param_dtype=self.param_dtype, name='conv')(x)
    if self.use_bn:
      x = self.norm(name='bn')(x)
    if self.act is not None:
      x = self.act(x)
    return mask_invalid(x, sizes)
