"""Model factory: `create_model(config, num_classes)` -> a linen Module.

Every string choice of config.model is looked up in an explicit dict below; an
unknown value raises an error that lists the valid ones.
"""

import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from pan_jax import errors
from pan_jax.models import baselines
from pan_jax.models import fpa
from pan_jax.models import gau
from pan_jax.models import pan
from pan_jax.models import resnet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
BACKBONES = resnet.ARCHS
STEMS = resnet.STEMS
CENTERS = {'fpa': fpa.FPA, 'ppm': baselines.PPM, 'aspp': baselines.ASPP,
           'none': baselines.Projection}
DECODERS = ('gau', 'bilinear')
GATES = {'relu': nn.relu, 'sigmoid': nn.sigmoid}
FPA_POOLING = ('avg', 'max')
FPA_ATTENTION = ('pyramid', 'se')
FPA_GLOBAL = ('add', 'concat', 'none')


def _choice(field: str, value: Any, valid) -> Any:
  if value not in valid:
    raise errors.ConfigError(f'unknown {field}={value!r}; valid: '
                             f'{", ".join(map(str, valid))}')
  return valid[value] if isinstance(valid, dict) else value


def _recompute_stages(stages) -> Tuple[int, ...]:
  """model.recompute_stages as a tuple of ResNet stage numbers (1-4)."""
  stages = tuple(stages)
  if any(s not in (1, 2, 3, 4) for s in stages):
    raise errors.ConfigError(f'model.recompute_stages={stages!r}: expected '
                             'ResNet stage numbers out of 1, 2, 3, 4')
  return stages


def min_input_size(config) -> int:
  """Smallest image side the configured network accepts.

  With ceil-mode pyramid pooling every size works; 2 x output_stride keeps c5
  at least 2x2 so the pyramid and the global context see more than one pixel.
  PyTorch-style floor pooling (smp) needs c5 >= 8x8 for its three halvings.
  """
  model = config.model
  os_ = model.output_stride
  if model.center == 'fpa' and model.fpa.attention == 'pyramid' and (
      not model.fpa.ceil_mode):
    return 8 * os_
  return 2 * os_


def create_model(config, num_classes: Optional[int] = None) -> pan.PAN:
  """Builds the network described by `config.model` and `config.compute_dtype`.

  Args:
    config: the whole ConfigDict (configs/base.py documents every field).
    num_classes: logits per pixel. The datasets carry it in their metadata
      (`pan_jax.data.sources.get_meta(config.data).num_classes`); None reads it
      from there.

  Returns:
    A `PAN` module: `init(rng, images, train=False)` and
    `apply(variables, images, train=..., image_sizes=None)`.
  """
  model = config.model
  if num_classes is None:
    from pan_jax.data import sources  # pylint: disable=g-import-not-at-top
    num_classes = sources.get_meta(config.data).num_classes
  dtype = _choice('compute_dtype', config.compute_dtype, DTYPES)
  param_dtype = jnp.float32
  _choice('model.backbone', model.backbone, BACKBONES)
  _choice('model.stem', model.stem, STEMS)
  _choice('model.output_stride', model.output_stride, resnet.OUTPUT_STRIDES)
  center_cls = _choice('model.center', model.center, CENTERS)
  _choice('model.decoder', model.decoder, DECODERS)
  align = bool(model.align_corners)
  common = dict(dtype=dtype, param_dtype=param_dtype)

  backbone = functools.partial(
      resnet.create_resnet, model.backbone, stem=model.stem,
      base_width=model.base_width, avg_down=model.avg_down,
      output_stride=model.output_stride,
      contract_dilation=model.contract_dilation,
      multi_grid=tuple(model.multi_grid),
      recompute_stages=_recompute_stages(model.recompute_stages), **common)
  features = model.decoder_channels
  if model.center == 'fpa':
    center = functools.partial(
        center_cls, features,
        attention=_choice('model.fpa.attention', model.fpa.attention,
                          FPA_ATTENTION),
        pooling=_choice('model.fpa.pooling', model.fpa.pooling, FPA_POOLING),
        kernels=tuple(model.fpa.kernels),
        pyramid_channels=model.fpa.pyramid_channels,
        global_branch=_choice('model.fpa.global_branch',
                              model.fpa.global_branch, FPA_GLOBAL),
        pooled_bn=model.pooled_bn, use_bias=model.head_conv_bias,
        ceil_mode=model.fpa.ceil_mode, align_corners=align, **common)
  elif model.center == 'ppm':
    center = functools.partial(center_cls, features, bins=tuple(model.ppm.bins),
                               align_corners=align, **common)
  elif model.center == 'aspp':
    # Rates are defined at output stride 16 and scale with the resolution.
    scale = 16 // model.output_stride if model.output_stride <= 16 else 1
    rates = tuple(r * scale for r in model.aspp.rates)
    if model.output_stride == 32:
      rates = tuple(max(1, r // 2) for r in model.aspp.rates)
    center = functools.partial(center_cls, features, rates=rates, **common)
  else:
    center = functools.partial(center_cls, features, **common)
  if len(tuple(model.fpa.kernels)) != 3:
    raise errors.ConfigError(
        f'model.fpa.kernels needs 3 sizes, got {model.fpa.kernels}')

  decoder = None
  if model.decoder == 'gau':
    if model.gau.low_level_kernel not in (1, 3):
      raise errors.ConfigError('model.gau.low_level_kernel must be 1 or 3, '
                               f'got {model.gau.low_level_kernel!r}')
    decoder = functools.partial(
        gau.GAU, features, low_level_kernel=model.gau.low_level_kernel,
        global_context=model.gau.global_context,
        gate=_choice('model.gau.gate', model.gau.gate, GATES),
        pooled_bn=model.pooled_bn, use_bias=model.head_conv_bias,
        align_corners=align, **common)

  return pan.PAN(
      num_classes=num_classes,
      backbone=backbone,
      center=center, gau=decoder,
      feature_strides=resnet.feature_strides(model.output_stride),
      min_size=min_input_size(config),
      classifier_kernel=model.classifier_kernel, align_corners=align,
      bn_momentum=model.bn_momentum, bn_epsilon=model.bn_epsilon, **common)
