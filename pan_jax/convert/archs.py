"""What a weight file holds: format, architecture, the pan_jax variables.

The architecture is inferred from the keys (blocks per stage, stem widths,
shortcut layout) or stated with --arch; `target_variables` gives the pan_jax
variables (shapes) a file of that format and architecture fills.
"""

import dataclasses
import functools
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pan_jax import defaults
from pan_jax import models
from pan_jax.convert import readers
from pan_jax.data import sources
from pan_jax.data import voc
from pan_jax.models import resnet

FORMATS = ('torchvision', 'timm', 'mmseg', 'smp')

# Architecture-name suffix -> (stem, avg_down), per format: resnet101 +
# 'd' = timm's resnet101d. These are the variants pan_jax's ResNet builds.
ARCH_SUFFIXES = {
    'torchvision': {'': ('torchvision', False)},
    'timm': {
        '': ('torchvision', False),
        'c': ('deep_narrow', False),
        'd': ('deep_narrow', True),
        's': ('deep', False),
        'e': ('deep', True),
    },
    'mmseg': {
        '': ('torchvision', False),
        '_v1c': ('deep_narrow', False),
        '_v1d': ('deep_narrow', True),
    },
    'smp': {'': ('torchvision', False)},
}

# How the deep stem's layers are named: pan_jax module -> source module.
DEEP_STEM_NAMES = {
    'timm': {'stem_conv1': 'conv1.0', 'stem_bn1': 'conv1.1',
             'stem_conv2': 'conv1.3', 'stem_bn2': 'conv1.4',
             'stem_conv3': 'conv1.6', 'stem_bn3': 'bn1'},
    'mmseg': {'stem_conv1': 'stem.0', 'stem_bn1': 'stem.1',
              'stem_conv2': 'stem.3', 'stem_bn2': 'stem.4',
              'stem_conv3': 'stem.6', 'stem_bn3': 'stem.7'},
}

@dataclasses.dataclass(frozen=True)
class Arch:
  """What a file holds, in pan_jax's terms.

  Attributes:
    name: the architecture's usual name in its library (resnet101d).
    backbone: key of pan_jax.models.resnet.ARCHS.
    stem: key of pan_jax.models.resnet.STEMS.
    avg_down: timm 'd' shortcut.
    num_classes: smp only: classes of the segmentation head.
    decoder_channels: smp only: width of the decoder.
  """
  name: str
  backbone: str
  stem: str
  avg_down: bool
  num_classes: int = 0
  decoder_channels: int = 0

  def model_fields(self) -> Dict[str, Any]:
    """The config.model fields these weights need (pretrained.ARCH_FIELDS)."""
    return {'backbone': self.backbone, 'stem': self.stem,
            'avg_down': self.avg_down, 'base_width': 64}


def parse_arch(fmt: str, name: str) -> Arch:
  """Arch from an --arch name such as resnet101, resnet50d, resnet101_v1c."""
  suffixes = ARCH_SUFFIXES[fmt]
  match = re.fullmatch(r'(resnet\d+)(.*)', name)
  valid = ', '.join(f'resnet<depth>{s}' for s in suffixes)
  if not match or match.group(2) not in suffixes:
    raise readers.ConversionError(
        f'--arch={name!r} is not a {fmt} ResNet pan_jax can build; valid: '
        f'{valid} with depth in {_depths()}')
  backbone, suffix = match.groups()
  if backbone not in resnet.ARCHS:
    raise readers.ConversionError(
        f'--arch={name!r}: depth not supported; pan_jax builds '
        f'{", ".join(sorted(resnet.ARCHS))}')
  stem, avg_down = suffixes[suffix]
  return Arch(name, backbone, stem, avg_down)


def _depths() -> str:
  return ', '.join(sorted((a[len('resnet'):] for a in resnet.ARCHS), key=int))


def backbone_prefix(fmt: str) -> str:
  return 'encoder.' if fmt == 'smp' else ''


def infer_arch(fmt: str, state: Mapping[str, np.ndarray],
               path: str) -> Arch:
  """Reads the architecture off the keys and shapes of a state dict.

  Args:
    fmt: one of FORMATS.
    state: the (prefix-stripped) state dict.
    path: the file, for messages.

  Returns:
    The Arch; `Arch.name` is the library's name (resnet101d, ...).

  Raises:
    ConversionError: a layout pan_jax's ResNet cannot build.
  """
  prefix = backbone_prefix(fmt)
  blocks = {}
  for key in state:
    match = re.match(re.escape(prefix) + r'layer([1-4])\.(\d+)\.', key)
    if match:
      blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
  counts = tuple(len(blocks.get(i, ())) for i in range(1, 5))
  bottleneck = f'{prefix}layer1.0.conv3.weight' in state
  block = resnet.Bottleneck if bottleneck else resnet.BasicBlock
  backbone = next((name for name, (b, sizes) in resnet.ARCHS.items()
                   if b is block and tuple(sizes) == counts), None)
  if backbone is None:
    raise readers.ConversionError(
        f'{path}: {counts} {block.__name__} blocks in layer1..layer4 match no '
        f'ResNet pan_jax builds ({", ".join(sorted(resnet.ARCHS))})')

  if f'{prefix}conv1.weight' in state:
    stem = 'torchvision'
  else:
    names = DEEP_STEM_NAMES.get(fmt)
    if names is None or f'{prefix}{names["stem_conv1"]}.weight' not in state:
      raise readers.ConversionError(
          f'{path}: no stem found: expected {prefix}conv1.weight (7x7 stem)'
          + (f' or {names["stem_conv1"]}.weight (deep stem)' if names else ''))
    widths = tuple(int(state[f'{names[c]}.weight'].shape[0])
                   for c in ('stem_conv1', 'stem_conv2', 'stem_conv3')
                   if f'{names[c]}.weight' in state)
    stem = next((s for s, w in resnet.STEMS.items() if tuple(w) == widths),
                None)
    if stem is None:
      raise readers.ConversionError(
          f'{path}: deep stem of widths {widths} matches no pan_jax stem '
          f'({", ".join(f"{s} {w}" for s, w in resnet.STEMS.items())})')
  # timm's / mmseg's avg-pool shortcut puts the conv at downsample.1 and the
  # BN at downsample.2; the plain one has them at .0 and .1.
  avg_down = any(re.match(re.escape(prefix) + r'layer\d\.0\.downsample\.2\.',
                          k) for k in state)
  suffix = next((s for s, v in ARCH_SUFFIXES[fmt].items()
                 if v == (stem, avg_down)), None)
  if suffix is None:
    names = ', '.join('resnet<depth>' + s for s in ARCH_SUFFIXES[fmt])
    raise readers.ConversionError(
        f'{path}: a {backbone} with a {stem} stem and '
        f'{"avg-pool" if avg_down else "strided-conv"} shortcuts is no '
        f'{fmt} architecture pan_jax knows ({fmt} names: {names}); try '
        'another --format')
  return Arch(backbone + suffix, backbone, stem, avg_down)


def guess_format(state: Mapping[str, Any]) -> Optional[str]:
  """Which library a state dict most likely comes from (for hints)."""
  keys = set(state)
  if any(k.startswith('encoder.') for k in keys) and any(
      k.startswith('decoder.') for k in keys):
    return 'smp'
  if any(k.startswith(('stem.', 'backbone.')) for k in keys):
    return 'mmseg'
  if 'conv1.0.weight' in keys:
    return 'timm'
  if 'conv1.weight' in keys:
    return 'torchvision'
  return None


# Keys a state dict of each format must have (after prefix handling).
_SIGNATURE_KEYS = {
    'torchvision': ('conv1.weight',),
    'timm': ('conv1.weight', 'conv1.0.weight'),
    'mmseg': ('conv1.weight', 'stem.0.weight'),
    'smp': ('segmentation_head.0.weight',),
}


def check_format(fmt: str, state: Mapping[str, Any], path: str) -> None:
  if any(k in state for k in _SIGNATURE_KEYS[fmt]):
    if fmt != 'smp' or 'encoder.conv1.weight' in state:
      return
  guess = guess_format(state)
  hint = (f'; it looks like a {guess} file: try --format={guess}'
          if guess and guess != fmt else '')
  first = ', '.join(list(state)[:4])
  raise readers.ConversionError(
      f'{path} is not a {fmt} state dict: none of '
      f'{", ".join(_SIGNATURE_KEYS[fmt])} is present (its first keys: {first})'
      f'{hint}')


def split_mmseg(state: Dict[str, np.ndarray]
                 ) -> Tuple[Dict[str, np.ndarray], List[str]]:
  """The 'backbone.*' part of an mmseg segmentation checkpoint.

  Returns:
    (backbone state dict without the prefix, the decode_head.* and
    auxiliary_head.* keys left out).
  """
  backbone, heads, other = {}, [], []
  for key, value in state.items():
    if key.startswith('backbone.'):
      backbone[key[len('backbone.'):]] = value
    elif key.startswith(('decode_head.', 'auxiliary_head.')):
      heads.append(key)
    else:
      other.append(key)
  if other:
    raise readers.ConversionError(
        f'unexpected key {other[0]!r} beside the mmseg backbone (only '
        'backbone.*, decode_head.* and auxiliary_head.* are understood; '
        f'{len(other)} such keys)')
  return backbone, heads


# --------------------------------------------------------- target networks --


def _bn():
  """BatchNorm in inference mode (momentum and epsilon as configs/base.py)."""
  return functools.partial(nn.BatchNorm, use_running_average=True,
                           momentum=0.9, epsilon=1e-5)


def backbone_module(arch: Arch, output_stride: int = 32,
                    contract_dilation: bool = True) -> resnet.ResNet:
  """The pan_jax ResNet that holds an ImageNet Arch's weights (eval mode)."""
  return resnet.create_resnet(
      arch.backbone, norm=_bn(), dtype=jnp.float32, param_dtype=jnp.float32,
      stem=arch.stem, avg_down=arch.avg_down, base_width=64,
      output_stride=output_stride, contract_dilation=contract_dilation)


def smp_config(backbone: str, num_classes: int = 21,
               decoder_channels: int = 32) -> ml_collections.ConfigDict:
  """The whole pan_jax config of smp.PAN(encoder_name=backbone).

  The base config with smp's architecture (defaults.use_smp_pan), as
  configs/smp_pan.py has it. The data section names VOC for 21 classes and a
  user 'folder' dataset otherwise.

  Args:
    backbone: resnet18 ... resnet152.
    num_classes: classes of the segmentation head.
    decoder_channels: smp's decoder_channels (32 by default).

  Returns:
    A ConfigDict with every field of pan_jax.defaults.
  """
  config = defaults.get_config()
  defaults.use_smp_pan(config.model, backbone)
  config.model.decoder_channels = decoder_channels
  # As every VOC recipe: training this config needs init_from (the converted
  # network itself, when fine-tuning it).
  config.model.require_init_from = True
  if num_classes != len(voc.CLASS_NAMES):
    config.data.name = 'folder'
    config.data.train_split = 'train'
  return config


def dataset_meta(num_classes: int) -> sources.DatasetMeta:
  """dataset.json of a converted smp model: VOC's classes, or generic ones."""
  if num_classes == len(voc.CLASS_NAMES):
    name, names = 'voc2012_aug', tuple(voc.CLASS_NAMES)
  else:
    name, names = 'folder', tuple(f'class_{i}' for i in range(num_classes))
  return sources.DatasetMeta(name=name, num_classes=num_classes,
                             class_names=names,
                             palette=tuple(voc.color_map(num_classes)))


def _abstract_variables(init_fn, size: Tuple[int, int]
                        ) -> Dict[Tuple[str, ...], Any]:
  """Flattened {path: ShapeDtypeStruct} of init_fn(rng, images), no compute."""
  images = jax.ShapeDtypeStruct((1,) + tuple(size) + (3,), jnp.float32)
  shapes = jax.eval_shape(lambda x: init_fn(jax.random.PRNGKey(0), x), images)
  return traverse_util.flatten_dict(shapes)


def target_variables(fmt: str, arch: Arch
                     ) -> Dict[Tuple[str, ...], jax.ShapeDtypeStruct]:
  """The pan_jax variables a file of `fmt` and `arch` fills.

  Args:
    fmt: one of FORMATS.
    arch: for smp, with num_classes and decoder_channels set.

  Returns:
    {('params' | 'batch_stats', module..., leaf): ShapeDtypeStruct}: the
    backbone's variables (under 'backbone') for ImageNet formats, the whole
    network's for smp. `source_key` names the PyTorch key of each.
  """
  if fmt == 'smp':
    config = smp_config(arch.backbone, arch.num_classes, arch.decoder_channels)
    module = models.create_model(config, arch.num_classes)
    # Shapes do not depend on the input size; this one suits every config.
    return _abstract_variables(
        functools.partial(module.init, train=False), (256, 256))
  # The backbone alone; its variables live under 'backbone' in the PAN.
  return {(k[0], 'backbone') + k[1:]: v for k, v in _abstract_variables(
      backbone_module(arch).init, (64, 64)).items()}
