"""Dilated ResNet backbones returning {'c2', 'c3', 'c4', 'c5'}.

ResNet v1.5 (stride on the 3x3 conv, as torchvision, timm and mmseg's
style='pytorch'). Variants:

* stem: 'torchvision' (7x7 conv, 64), 'deep' (3x3 convs 64-64-128, PSPNet/DUC
  and the PAN paper; timm 's'), 'deep_narrow' (32-32-64: mmseg ResNetV1c, timm
  'c' and 'd'); widths scale with `base_width / 64`.
* avg_down: timm 'd' / mmseg V1d shortcut (2x2 average pool, then a stride-1
  1x1 conv).
* output stride 8 / 16 / 32: the strides of res4 / res5 become dilation.
* contract_dilation: the first block of a dilated stage runs at half the rate
  (torchvision's replace_stride_with_dilation, mmseg); False is smp's choice.
* multi_grid: per-block multipliers of the res5 rate (DeepLabv3).

Submodule names follow torchvision's state-dict keys (`conv1`, `bn1`,
`layer3_5/conv2`, `layer2_0/downsample_conv`, ...) so that pretrained weights
map one to one (pan_jax/convert.py).
"""

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pan_jax.models import layers

Array = jax.Array
ModuleDef = Any

# name -> (first-conv widths relative to base_width 64). The last entry is the
# width entering layer1.
STEMS = {
    'torchvision': (64,),
    'deep': (64, 64, 128),
    'deep_narrow': (32, 32, 64),
}


def _scaled(width: int, base_width: int) -> int:
  return max(1, width * base_width // 64)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34)."""
  planes: int
  stride: int
  dilation: int
  first_dilation: int
  downsample: bool
  avg_down: bool
  conv: ModuleDef
  norm: ModuleDef
  expansion = 1

  @nn.compact
  def __call__(self, x, sizes):
    out_sizes = layers.down_sizes(sizes) if self.stride == 2 else sizes
    y = self.conv(self.planes, (3, 3), (self.stride, self.stride),
                  padding=layers.pad_for(3, self.first_dilation),
                  kernel_dilation=self.first_dilation, name='conv1')(x)
    y = layers.relu(self.norm(name='bn1')(y))
    y = layers.mask_invalid(y, out_sizes)
    y = self.conv(self.planes, (3, 3), padding=layers.pad_for(3, self.dilation),
                  kernel_dilation=self.dilation, name='conv2')(y)
    y = self.norm(name='bn2')(y)
    shortcut = _shortcut(self, x, sizes, self.planes)
    return layers.mask_invalid(layers.relu(y + shortcut), out_sizes)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, dilated) -> 1x1 x4 (ResNet-50/101/152)."""
  planes: int
  stride: int
  dilation: int
  first_dilation: int
  downsample: bool
  avg_down: bool
  conv: ModuleDef
  norm: ModuleDef
  expansion = 4

  @nn.compact
  def __call__(self, x, sizes):
    out_sizes = layers.down_sizes(sizes) if self.stride == 2 else sizes
    y = self.conv(self.planes, (1, 1), padding=((0, 0), (0, 0)),
                  name='conv1')(x)
    y = layers.mask_invalid(layers.relu(self.norm(name='bn1')(y)), sizes)
    # The first block of a stage carries its stride (and, when dilated with
    # contract_dilation, half the stage's rate) on the 3x3 conv.
    y = self.conv(self.planes, (3, 3), (self.stride, self.stride),
                  padding=layers.pad_for(3, self.first_dilation),
                  kernel_dilation=self.first_dilation, name='conv2')(y)
    y = layers.mask_invalid(layers.relu(self.norm(name='bn2')(y)), out_sizes)
    y = self.conv(self.planes * 4, (1, 1), padding=((0, 0), (0, 0)),
                  name='conv3')(y)
    y = self.norm(name='bn3')(y)
    shortcut = _shortcut(self, x, sizes, self.planes * 4)
    return layers.mask_invalid(layers.relu(y + shortcut), out_sizes)


def _shortcut(block, x, sizes, features):
  """Identity, strided 1x1 conv + BN, or timm 'd' avg-pool + 1x1 conv + BN."""
  if not block.downsample:
    return x
  stride = block.stride
  if block.avg_down:
    if stride == 2:
      # AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False).
      x = layers.pool2x2(x, sizes, 'avg', ceil=True)
    elif block.dilation > 1:
      # timm's AvgPool2dSame(2, stride=1) in dilated stages: zero-pad one
      # row/column at the end, average 2x2 windows counting the zeros.
      x = layers.mask_invalid(x, sizes)
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      x = nn.avg_pool(x, (2, 2), strides=(1, 1))
    stride = 1
  x = block.conv(features, (1, 1), (stride, stride), padding=((0, 0), (0, 0)),
                 name='downsample_conv')(x)
  return block.norm(name='downsample_bn')(x)


# name -> (block, blocks per stage).
ARCHS = {
    'resnet18': (BasicBlock, (2, 2, 2, 2)),
    'resnet34': (BasicBlock, (3, 4, 6, 3)),
    'resnet50': (Bottleneck, (3, 4, 6, 3)),
    'resnet101': (Bottleneck, (3, 4, 23, 3)),
    'resnet152': (Bottleneck, (3, 8, 36, 3)),
}

# output stride -> (strides, dilations) of layer1..layer4.
OUTPUT_STRIDES = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}


def feature_strides(output_stride: int) -> Dict[str, int]:
  """Stride of each returned feature map for an output stride."""
  strides, _ = OUTPUT_STRIDES[output_stride]
  out, total = {}, 4
  for i, s in enumerate(strides):
    total *= s
    out[f'c{i + 2}'] = total
  return out


class ResNet(nn.Module):
  """ImageNet ResNet trunk without the classifier.

  Attributes:
    stage_sizes: blocks per stage.
    block: BasicBlock or Bottleneck.
    stem: key of STEMS.
    base_width: width of layer1 (64 for every published ResNet).
    avg_down: timm 'd' shortcut.
    output_stride: key of OUTPUT_STRIDES.
    contract_dilation: first dilated block at half the rate.
    multi_grid: res5 rate multipliers; all ones = plain dilation.
    recompute_stages: stages (1-4) whose blocks keep only their input for the
      backward pass and run their forward again when it reaches them.
    norm: BatchNorm partial; conv: nn.Conv partial (dtype set).
  """
  stage_sizes: Sequence[int]
  block: Any
  norm: ModuleDef
  conv: ModuleDef
  stem: str = 'deep'
  base_width: int = 64
  avg_down: bool = False
  output_stride: int = 16
  contract_dilation: bool = True
  multi_grid: Tuple[int, ...] = (1, 1, 1)
  recompute_stages: Tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x: Array, sizes: Optional[Array] = None
               ) -> Dict[str, Array]:
    """Returns {'c2'..'c5'} at strides feature_strides(output_stride).

    Args:
      x: [B, H, W, 3] images.
      sizes: [B, 2] valid image sizes when padded to a canvas, else None.
    """
    widths = [_scaled(w, self.base_width) for w in STEMS[self.stem]]
    sizes = layers.down_sizes(sizes)
    if self.stem == 'torchvision':
      x = self.conv(widths[0], (7, 7), (2, 2), padding=layers.pad_for(7),
                    name='conv1')(x)
      x = layers.relu(self.norm(name='bn1')(x))
    else:
      for i, width in enumerate(widths):
        x = self.conv(width, (3, 3), (2, 2) if i == 0 else (1, 1),
                      padding=layers.pad_for(3), name=f'stem_conv{i + 1}')(x)
        x = layers.relu(self.norm(name=f'stem_bn{i + 1}')(x))
        x = layers.mask_invalid(x, sizes)
    # Post-ReLU values are >= 0, so zeros in the padding never win the max.
    x = layers.mask_invalid(x, sizes)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    sizes = layers.down_sizes(sizes)
    # An even valid size n leaves output n/2 (outside the valid region) with
    # the max over input n-1, which is valid: zero it like every padding.
    x = layers.mask_invalid(x, sizes)

    strides, dilations = OUTPUT_STRIDES[self.output_stride]
    in_width = widths[-1]
    features = {}
    for i, num_blocks in enumerate(self.stage_sizes):
      planes = _scaled(64 * 2**i, self.base_width)
      # Rate of every 3x3 conv of each block; the first block's first 3x3
      # conv may run at half the rate (contract_dilation).
      rates = [dilations[i]] * num_blocks
      grid = tuple(self.multi_grid)
      if i == 3 and any(g != 1 for g in grid):
        if len(grid) != num_blocks:
          raise ValueError(
              f'model.multi_grid={grid} needs one rate per res5 block '
              f'({num_blocks} for this backbone)')
        rates = [dilations[i] * g for g in grid]
      first_rates = list(rates)
      if self.contract_dilation and dilations[i] > 1 and rates == [
          dilations[i]] * num_blocks:
        first_rates[0] = dilations[i] // 2
      for j in range(num_blocks):
        stride = strides[i] if j == 0 else 1
        block = self.block(
            planes=planes, stride=stride, dilation=rates[j],
            first_dilation=first_rates[j],
            downsample=(j == 0 and (stride != 1 or
                                    in_width != planes * self.block.expansion)),
            avg_down=self.avg_down, conv=self.conv, norm=self.norm,
            name=f'layer{i + 1}_{j}')
        # Padded canvases (sizes) are evaluation only: nothing to recompute.
        if i + 1 in self.recompute_stages and sizes is None:
          x = _recomputed_in_backward(block, x)
        else:
          x = block(x, sizes)
        if stride == 2:
          sizes = layers.down_sizes(sizes)
        in_width = planes * self.block.expansion
      features[f'c{i + 2}'] = x
    return features


def _recomputed_in_backward(block: nn.Module, x: Array) -> Array:
  """`block(x)`, keeping only x and recomputing the block in the backward pass.

  Unlike nn.remat, whose recomputation XLA CPU schedules during the forward
  pass (keeping the activations after all), the recomputation here depends on
  the block's output cotangent, so it can only run once the backward pass has
  reached the block: of the stage only the block inputs are live at the peak.
  Gradients and BatchNorm statistics are those of `block(x)`.

  Args:
    block: a bound-to-be BasicBlock or Bottleneck (its name set).
    x: [B, H, W, C] input.

  Returns:
    The block's output.
  """
  unbound = block.clone(parent=None, name=None)

  def forward(module, x):
    return module(x, None)

  def forward_keeping_input(module, x):
    variables = module.variables
    return module(x, None), (variables['params'],
                             variables.get('batch_stats', {}), x)

  def backward(residuals, g):
    params, stats, x = residuals
    # A data dependency on the cotangent (adding an exact 0 unless g holds
    # infinities or NaNs, which poison the gradient anyway): it keeps XLA
    # from hoisting the recomputation into the forward pass.
    x = x + jnp.zeros((), x.dtype) * g.reshape(-1)[0].astype(x.dtype)

    def apply(params, x):
      y, _ = unbound.apply({'params': params, 'batch_stats': stats}, x, None,
                           mutable=['batch_stats'])
      return y

    _, vjp = jax.vjp(apply, params, x)
    d_params, d_x = vjp(g)
    return {'params': d_params}, d_x

  return nn.custom_vjp(forward, forward_fn=forward_keeping_input,
                       backward_fn=backward)(block, x)


def create_resnet(arch: str, *, norm: ModuleDef, dtype: Any,
                  param_dtype: Any, **kwargs) -> ResNet:
  """Builds ARCHS[arch] with the conv partial every ResNet layer uses."""
  if arch not in ARCHS:
    raise ValueError(
        f'unknown backbone {arch!r}; valid: {", ".join(sorted(ARCHS))}')
  stem = kwargs.get('stem', 'deep')
  if stem not in STEMS:
    raise ValueError(
        f'unknown stem {stem!r}; valid: {", ".join(sorted(STEMS))}')
  output_stride = kwargs.get('output_stride', 16)
  if output_stride not in OUTPUT_STRIDES:
    raise ValueError(f'output_stride must be one of '
                     f'{sorted(OUTPUT_STRIDES)}, got {output_stride!r}')
  block, stage_sizes = ARCHS[arch]
  conv = functools.partial(nn.Conv, use_bias=False, kernel_init=layers.conv_init,
                           dtype=dtype, param_dtype=param_dtype,
                           conv_general_dilated=layers.conv_general_dilated)
  return ResNet(stage_sizes=stage_sizes, block=block, norm=norm, conv=conv,
                **kwargs)
