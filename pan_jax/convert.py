r"""Converts PyTorch ResNet and smp PAN weights into pan_jax checkpoints.

    python -m pan_jax.convert --format=torchvision|timm|mmseg|smp \
        --input=FILE --output=DIR [--arch=NAME]

FILE is a `.pth`/`.pt` (read with `torch.load(weights_only=True)`, which
never runs pickled code; torch is needed only for these) or a `.safetensors`
file (read with numpy alone). A raw state dict and the usual wrappers
({'state_dict': ...} from mmseg/mmcv and timm's trainer, {'model': ...} from
torchvision's references) are accepted, and DataParallel's 'module.' prefix
is stripped.

Formats and what they give:
  torchvision  ImageNet ResNet-18..152 (7x7 stem)        -> backbone
  timm         resnet{N} / {N}c / {N}d / {N}s / {N}e      -> backbone
  mmseg        ResNet / ResNetV1c / ResNetV1d ('backbone.' prefix and the
               meta/state_dict wrapper of mmseg checkpoints are handled)
                                                           -> backbone
  smp          segmentation_models_pytorch PAN with a ResNet encoder
                                                           -> whole network
The architecture is inferred from the keys (blocks per stage, stem widths,
shortcut layout) and printed; `--arch` states it instead (e.g. resnet101d,
resnet101_v1c), and then the file must match it.

Every tensor of the file is used exactly once. Only BatchNorm's
`num_batches_tracked` counters and the ImageNet classifier `fc.*` are dropped
(and for mmseg segmentation checkpoints their `decode_head.*` /
`auxiliary_head.*`, which belong to another head); the summary line counts
them. A missing or unexpected key, or a shape mismatch, is an error naming
the key and both shapes.

The output directory is described in pan_jax/pretrained.py. Backbones are
loaded for training with `--config.model.init_from=DIR` (plus the
`--config.model.*` overrides the summary prints); a converted smp model is an
inference checkpoint for `pan_jax.evaluate` / `pan_jax.predict`.
"""

import dataclasses
import functools
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pan_jax import export
from pan_jax import models
from pan_jax import pretrained
from pan_jax import runtime
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

# smp PAN's decoder: pan_jax module path -> smp module (pan_jax/models/fpa.py
# and gau.py document the correspondence).
SMP_HEAD_NAMES = {
    ('center', 'main'): 'decoder.fpa.mid.0',
    ('center', 'glob'): 'decoder.fpa.branch1.1',
    ('center', 'down1'): 'decoder.fpa.down1.1',
    ('center', 'down2'): 'decoder.fpa.down2.1',
    ('center', 'down3'): 'decoder.fpa.down3.1',
    ('center', 'lateral3'): 'decoder.fpa.down3.2',
    ('center', 'lateral2'): 'decoder.fpa.conv2',
    ('center', 'lateral1'): 'decoder.fpa.conv1',
    ('gau3', 'low'): 'decoder.gau3.conv2',
    ('gau3', 'context'): 'decoder.gau3.conv1.1',
    ('gau2', 'low'): 'decoder.gau2.conv2',
    ('gau2', 'context'): 'decoder.gau2.conv1.1',
    ('gau1', 'low'): 'decoder.gau1.conv2',
    ('gau1', 'context'): 'decoder.gau1.conv1.1',
    ('classifier',): 'segmentation_head.0',
}

# flax leaf name -> PyTorch parameter / buffer name.
LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
              'mean': 'running_mean', 'var': 'running_var'}

# safetensors dtype -> numpy dtype.
SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': jnp.bfloat16, 'I64': np.int64, 'I32': np.int32, 'I16': np.int16,
    'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}

# Entries of a checkpoint dict that hold the state dict, in order of
# preference (mmcv/mmseg and timm's trainer: 'state_dict'; torchvision's
# reference scripts: 'model').
WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict', 'net')

class ConversionError(ValueError):
  """A file that cannot be converted; the message names the key or field."""


# ------------------------------------------------------------------ reading --


def read_state_dict(path: str) -> Tuple[Dict[str, np.ndarray], str]:
  """Reads a PyTorch state dict from .pth/.pt (torch) or .safetensors (numpy).

  Args:
    path: the file.

  Returns:
    (state, note): key -> numpy array (floating tensors as float32, others
    as stored), and a phrase saying how the file was unwrapped.

  Raises:
    ConversionError: unreadable, corrupted, or not a state dict.
  """
  if not os.path.isfile(path):
    raise ConversionError(f'--input={path}: no such file')
  if path.endswith('.safetensors'):
    state, note = read_safetensors(path), 'safetensors file'
  elif path.endswith(('.pth', '.pt', '.bin', '.ckpt')):
    state, note = _read_torch(path)
  else:
    raise ConversionError(
        f'--input={path}: unknown file type; expected .pth, .pt (PyTorch) or '
        '.safetensors')
  if state and all(k.startswith('module.') for k in state):
    state = {k[len('module.'):]: v for k, v in state.items()}
    note += ", 'module.' prefix stripped"
  return state, note


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Parses a .safetensors file with numpy (no torch, no safetensors package).

  The format: an 8-byte little-endian header length N, N bytes of JSON
  ({name: {dtype, shape, data_offsets}, '__metadata__': ...}), then the
  tensors' bytes.

  Args:
    path: the file.

  Returns:
    name -> array (floating point as float32).

  Raises:
    ConversionError: a truncated or malformed file, naming the tensor.
  """
  with open(path, 'rb') as f:
    data = f.read()
  if len(data) < 8:
    raise ConversionError(f'{path}: not a safetensors file ({len(data)} bytes)')
  (header_size,) = struct.unpack('<Q', data[:8])
  if 8 + header_size > len(data):
    raise ConversionError(
        f'{path}: truncated or not a safetensors file (its header claims '
        f'{header_size} bytes, the file has {len(data)} in all)')
  try:
    header = json.loads(data[8:8 + header_size])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f'{path}: unreadable safetensors header: {e}') from e
  if not isinstance(header, dict):
    raise ConversionError(f'{path}: the safetensors header is not a mapping')
  body = memoryview(data)[8 + header_size:]
  state = {}
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    try:
      dtype = np.dtype(SAFETENSORS_DTYPES[entry['dtype']])
      shape = tuple(int(d) for d in entry['shape'])
      begin, end = (int(o) for o in entry['data_offsets'])
    except (KeyError, TypeError, ValueError) as e:
      raise ConversionError(
          f'{path}: tensor {name!r} has a malformed header entry {entry!r}'
          ) from e
    want = int(np.prod(shape)) * dtype.itemsize
    if not 0 <= begin <= end:
      raise ConversionError(
          f'{path}: tensor {name!r} has invalid data offsets {begin}..{end}: '
          'the file is corrupted')
    if end > len(body):
      raise ConversionError(
          f'{path}: tensor {name!r} (shape {shape}) lies at bytes '
          f'{begin}..{end} of the data, but the file has only {len(body)}: '
          'the file is truncated')
    if end - begin != want:
      raise ConversionError(
          f'{path}: tensor {name!r} has {end - begin} bytes for shape {shape} '
          f'{entry["dtype"]} ({want} expected): the file is corrupted')
    array = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
    state[name] = _to_numpy_dtype(array)
  return state


def _to_numpy_dtype(array: np.ndarray) -> np.ndarray:
  """A writable copy; floating point (incl. bfloat16) as float32."""
  if np.issubdtype(array.dtype, np.floating) or array.dtype == jnp.bfloat16:
    return np.array(array, np.float32)
  return np.array(array)


def _read_torch(path: str) -> Tuple[Dict[str, np.ndarray], str]:
  """torch.load(weights_only=True) and unwrapping."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(
        f'reading {path} needs PyTorch (pip install -r '
        'requirements-torch.txt), or convert it to .safetensors elsewhere'
        ) from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # weights_only refuses pickled code (UnpicklingError); a truncated or
    # corrupted zip archive raises RuntimeError. Either way, say which file.
    detail = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    if 'weights_only' in str(e) or 'Unsupported global' in str(e):
      hint = (' The file pickles Python objects besides tensors; re-save '
              'only the weights: torch.save(model.state_dict(), FILE).')
    else:
      hint = ' The file is truncated or corrupted.'
    raise ConversionError(
        f'{path}: torch.load(weights_only=True) failed: {detail}.{hint}'
        ) from e
  obj, note = _unwrap(obj, path, torch)
  state = {}
  for key, tensor in obj.items():
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
      tensor = tensor.to(torch.float32)
    state[key] = tensor.numpy().copy()
  return state, note


def _unwrap(obj: Any, path: str, torch: Any) -> Tuple[Dict[str, Any], str]:
  """Finds the state dict in what torch.load returned."""
  if not isinstance(obj, Mapping):
    raise ConversionError(
        f'{path} holds a {type(obj).__name__}, not a state dict (a mapping '
        'of names to tensors)')
  if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
    return dict(obj), 'plain state dict'
  for key in WRAPPER_KEYS:
    inner = obj.get(key)
    if isinstance(inner, Mapping) and inner and all(
        isinstance(v, torch.Tensor) for v in inner.values()):
      others = sorted(str(k) for k in obj if k != key)
      rest = f' (ignored: {", ".join(others)})' if others else ''
      return dict(inner), f'state dict in the {key!r} entry{rest}'
  raise ConversionError(
      f'{path} holds a dict with keys {sorted(map(str, obj))[:10]} but no '
      f'state dict: expected a mapping of names to tensors, or one under '
      f'{" / ".join(map(repr, WRAPPER_KEYS))}')


# ------------------------------------------------------------ architectures --


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
    raise ConversionError(
        f'--arch={name!r} is not a {fmt} ResNet pan_jax can build; valid: '
        f'{valid} with depth in {_depths()}')
  backbone, suffix = match.groups()
  if backbone not in resnet.ARCHS:
    raise ConversionError(
        f'--arch={name!r}: depth not supported; pan_jax builds '
        f'{", ".join(sorted(resnet.ARCHS))}')
  stem, avg_down = suffixes[suffix]
  return Arch(name, backbone, stem, avg_down)


def _depths() -> str:
  return ', '.join(sorted((a[len('resnet'):] for a in resnet.ARCHS), key=int))


def _backbone_prefix(fmt: str) -> str:
  return 'encoder.' if fmt == 'smp' else ''


def infer_arch(fmt: str, state: Mapping[str, np.ndarray], path: str) -> Arch:
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
  prefix = _backbone_prefix(fmt)
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
    raise ConversionError(
        f'{path}: {counts} {block.__name__} blocks in layer1..layer4 match no '
        f'ResNet pan_jax builds ({", ".join(sorted(resnet.ARCHS))})')

  if f'{prefix}conv1.weight' in state:
    stem = 'torchvision'
  else:
    names = DEEP_STEM_NAMES.get(fmt)
    if names is None or f'{prefix}{names["stem_conv1"]}.weight' not in state:
      raise ConversionError(
          f'{path}: no stem found: expected {prefix}conv1.weight (7x7 stem)'
          + (f' or {names["stem_conv1"]}.weight (deep stem)' if names else ''))
    widths = tuple(int(state[f'{names[c]}.weight'].shape[0])
                   for c in ('stem_conv1', 'stem_conv2', 'stem_conv3')
                   if f'{names[c]}.weight' in state)
    stem = next((s for s, w in resnet.STEMS.items() if tuple(w) == widths),
                None)
    if stem is None:
      raise ConversionError(
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
    raise ConversionError(
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


def _check_format(fmt: str, state: Mapping[str, Any], path: str) -> None:
  if any(k in state for k in _SIGNATURE_KEYS[fmt]):
    if fmt != 'smp' or 'encoder.conv1.weight' in state:
      return
  guess = guess_format(state)
  hint = (f'; it looks like a {guess} file: try --format={guess}'
          if guess and guess != fmt else '')
  first = ', '.join(list(state)[:4])
  raise ConversionError(
      f'{path} is not a {fmt} state dict: none of '
      f'{", ".join(_SIGNATURE_KEYS[fmt])} is present (its first keys: {first})'
      f'{hint}')


def _split_mmseg(state: Dict[str, np.ndarray]
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
    raise ConversionError(
        f'unexpected key {other[0]!r} beside the mmseg backbone (only '
        'backbone.*, decode_head.* and auxiliary_head.* are understood; '
        f'{len(other)} such keys)')
  return backbone, heads


# ----------------------------------------------------------------- targets --


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

  It equals configs/smp_pan.py's `get_config(backbone)` (checked by
  tests/test_convert.py), built here because library code does not import
  configs/. The data section names VOC for 21 classes and a user 'folder'
  dataset otherwise.

  Args:
    backbone: resnet18 ... resnet152.
    num_classes: classes of the segmentation head.
    decoder_channels: smp's decoder_channels (32 by default).

  Returns:
    A ConfigDict with every field of configs/base.py.
  """
  config = ml_collections.ConfigDict({
      'seed': 0, 'total_steps': 30_000, 'global_batch_size': 16,
      'log_every_steps': 50, 'eval_every_steps': 2_000,
      'checkpoint_every_steps': 1_000, 'max_checkpoints_to_keep': 3,
      'compute_dtype': 'float32',
      'model': {
          'backbone': backbone, 'stem': 'torchvision', 'avg_down': False,
          'base_width': 64, 'output_stride': 16, 'multi_grid': (1, 1, 1),
          'contract_dilation': False, 'center': 'fpa', 'decoder': 'gau',
          'decoder_channels': decoder_channels, 'head_conv_bias': True,
          'classifier_kernel': 3, 'pooled_bn': True, 'align_corners': True,
          'bn_momentum': 0.9, 'bn_epsilon': 1e-5, 'init_from': '',
          'fpa': {'attention': 'pyramid', 'pooling': 'max',
                  'kernels': (7, 5, 3), 'pyramid_channels': 1,
                  'ceil_mode': False, 'global_branch': 'add'},
          'gau': {'low_level_kernel': 3, 'global_context': True,
                  'gate': 'sigmoid'},
          'ppm': {'bins': (1, 2, 3, 6)},
          'aspp': {'rates': (6, 12, 18)},
      },
      'data': {
          'name': 'voc2012_aug' if num_classes == 21 else 'folder',
          'data_dir': 'data', 'train_split': 'train_aug', 'eval_split': 'val',
          'crop_size': 512, 'min_scale': 0.5, 'max_scale': 2.0,
          'num_workers': 4, 'prefetch_buffer_size': 2,
      },
      'eval': {
          'batch_size': 8, 'canvas_size': (512, 512), 'mode': 'whole',
          'window_size': (512, 512), 'window_stride': (341, 341),
          'scales': (1.0,), 'flip': False, 'num_overlays': 4,
      },
      'optim': {
          'optimizer': 'sgd', 'learning_rate': 4e-3, 'poly_power': 0.9,
          'warmup_steps': 0,
          'momentum': 0.9, 'weight_decay': 1e-4, 'decay_norm_and_bias': True,
      },
  })
  if num_classes != 21:
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


def _source_module(fmt: str, arch: Arch, path: Tuple[str, ...]) -> str:
  """The PyTorch module name of a pan_jax module path (without collection)."""
  if path[0] != 'backbone':
    if fmt != 'smp' or path not in SMP_HEAD_NAMES:
      raise ConversionError(
          f'no {fmt} name for pan_jax module {"/".join(path)}')
    return SMP_HEAD_NAMES[path]
  prefix = _backbone_prefix(fmt)
  name = path[1]
  if name.startswith('stem_'):
    return prefix + DEEP_STEM_NAMES[fmt][name]
  match = re.fullmatch(r'layer(\d)_(\d+)', name)
  if not match:  # conv1 / bn1 of the 7x7 stem.
    return prefix + name
  block = f'{prefix}layer{match.group(1)}.{match.group(2)}'
  layer = path[2]
  offset = 1 if arch.avg_down else 0  # downsample.0 is the avg pool.
  if layer == 'downsample_conv':
    return f'{block}.downsample.{offset}'
  if layer == 'downsample_bn':
    return f'{block}.downsample.{offset + 1}'
  return f'{block}.{layer}'


def source_key(fmt: str, arch: Arch, path: Tuple[str, ...]) -> str:
  """PyTorch state-dict key of a flattened pan_jax variable path.

  Args:
    fmt: one of FORMATS.
    arch: the architecture being converted.
    path: ('params' | 'batch_stats', module..., leaf), e.g. ('params',
      'backbone', 'layer2_0', 'downsample_conv', 'kernel').

  Returns:
    e.g. 'layer2.0.downsample.0.weight' (or 'encoder.' + that for smp).
  """
  module = path[1:-1]
  # ConvBN's inner 'conv' / 'bn' keep their names in smp's ConvBnRelu.
  if module[-1] in ('conv', 'bn') and module[0] != 'backbone':
    return (f'{_source_module(fmt, arch, module[:-1])}.{module[-1]}.'
            f'{LEAF_NAMES[path[-1]]}')
  return f'{_source_module(fmt, arch, module)}.{LEAF_NAMES[path[-1]]}'


def _droppable(fmt: str, key: str) -> bool:
  if key.endswith('num_batches_tracked'):
    return True
  return fmt != 'smp' and key.startswith('fc.')


def map_state_dict(fmt: str, arch: Arch, state: Mapping[str, np.ndarray],
                   targets: Mapping[Tuple[str, ...], Any], path: str
                   ) -> Tuple[Dict[str, Any], List[str]]:
  """Assigns every source tensor to exactly one pan_jax variable.

  Args:
    fmt: one of FORMATS.
    arch: the architecture.
    state: the source state dict (numpy).
    targets: flattened pan_jax variables {path: ShapeDtypeStruct}.
    path: the file, for messages.

  Returns:
    (variables, dropped): the nested {'params', 'batch_stats'} numpy tree,
    and the source keys deliberately left out (num_batches_tracked, fc.*).

  Raises:
    ConversionError: a missing key, an unexpected key, or a shape mismatch;
      the message names the key and both shapes.
  """
  hint = f' (converting {path} as {fmt} {arch.name})'
  out, used = {}, set()
  for target_path, target in targets.items():
    key = source_key(fmt, arch, target_path)
    name = '/'.join(target_path)
    if key not in state:
      raise ConversionError(
          f'missing key {key!r} for {name} (shape {tuple(target.shape)}){hint}')
    value = state[key]
    shape = tuple(target.shape)
    if len(shape) == 4:
      # PyTorch conv weights are OIHW; flax kernels are HWIO.
      want = (shape[3], shape[2], shape[0], shape[1])
    else:
      want = shape
    if tuple(value.shape) != want:
      raise ConversionError(
          f'key {key!r}: the file has shape {tuple(value.shape)}, {name} needs '
          f'{want}{hint}')
    if len(shape) == 4:
      value = value.transpose(2, 3, 1, 0)
    out[target_path] = np.ascontiguousarray(value, dtype=np.float32)
    used.add(key)
  dropped = [k for k in state if k not in used and _droppable(fmt, k)]
  unexpected = [k for k in state if k not in used and not _droppable(fmt, k)]
  if unexpected:
    raise ConversionError(
        f'unexpected key {unexpected[0]!r} (shape '
        f'{tuple(state[unexpected[0]].shape)}): no pan_jax variable takes it; '
        f'{len(unexpected)} such keys in all{hint}')
  return traverse_util.unflatten_dict(out), dropped


# ------------------------------------------------------------------ writing --


def _write_json(path: str, value: Any) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2)
    f.write('\n')


def write_checkpoint(output: str, variables: Mapping[str, Any],
                     info: Mapping[str, Any],
                     config: Optional[ml_collections.ConfigDict] = None,
                     meta: Optional[sources.DatasetMeta] = None) -> None:
  """Writes a converted directory (pan_jax/pretrained.py documents it).

  A whole network (`config` given) is written by pan_jax.export as an
  inference checkpoint, then pretrained.json is added. A backbone is written
  into a temporary sibling directory that is renamed to `output` at the end.
  Either way `output` appears only once its variables are complete.

  Args:
    output: the directory to create; must not exist.
    variables: {'params', 'batch_stats'} numpy tree.
    info: contents of pretrained.json.
    config: whole config (networks only).
    meta: dataset metadata (networks only).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  output = os.path.abspath(output)
  if os.path.exists(output):
    raise ConversionError(
        f'--output={output} already exists; choose a new directory or remove '
        'it')
  if config is not None:
    export.save_inference_checkpoint(output, config, meta, dict(variables),
                                     source=info['source']['file'])
    # Added last; without it the directory is still a valid inference
    # checkpoint, which pretrained.read_info also understands.
    _write_json(os.path.join(output, pretrained.INFO_FILE), dict(info))
    return
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(output) + '.tmp', dir=parent)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, pretrained.VARIABLES_DIR),
                      dict(variables))
    checkpointer.wait_until_finished()
    checkpointer.close()
    _write_json(os.path.join(tmp, pretrained.INFO_FILE), dict(info))
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# --------------------------------------------------------------- the driver --


def _smp_arch(state: Mapping[str, np.ndarray], path: str,
              arch_name: Optional[str]) -> Arch:
  if arch_name:
    base = parse_arch('smp', arch_name)
  else:
    base = infer_arch('smp', state, path)
  head = state['segmentation_head.0.weight']
  mid = state.get('decoder.fpa.mid.0.conv.weight')
  if mid is None:
    raise ConversionError(
        f"missing key 'decoder.fpa.mid.0.conv.weight' in {path}: not an smp "
        'PAN (its FPA centre block)')
  return dataclasses.replace(base, num_classes=int(head.shape[0]),
                             decoder_channels=int(mid.shape[0]))


def convert(fmt: str, input_path: str, output: str,
            arch_name: Optional[str] = None) -> str:
  """Converts FILE into a pan_jax checkpoint directory.

  Args:
    fmt: one of FORMATS.
    input_path: .pth / .pt / .safetensors file.
    output: directory to create.
    arch_name: the architecture (e.g. 'resnet101d'); None infers it.

  Returns:
    A summary: what was read, inferred, converted and dropped, and how to use
    the result.

  Raises:
    ConversionError: anything that does not fit; the message names the file,
      key or flag.
  """
  if fmt not in FORMATS:
    raise ConversionError(f'--format={fmt!r}; valid: {", ".join(FORMATS)}')
  state, note = read_state_dict(input_path)
  heads = []
  if fmt == 'mmseg' and any(k.startswith('backbone.') for k in state):
    state, heads = _split_mmseg(state)
    note += ", 'backbone.' prefix stripped"
  _check_format(fmt, state, input_path)

  if fmt == 'smp':
    arch = _smp_arch(state, input_path, arch_name)
    config = smp_config(arch.backbone, arch.num_classes, arch.decoder_channels)
  else:
    arch = (parse_arch(fmt, arch_name) if arch_name
            else infer_arch(fmt, state, input_path))
    config = None
  targets = target_variables(fmt, arch)
  how = 'as stated by --arch' if arch_name else 'inferred from the keys'

  try:
    variables, dropped = map_state_dict(fmt, arch, state, targets, input_path)
  except ConversionError as e:
    # With --arch, say what the file looks like when that differs.
    found = None
    if arch_name:
      try:
        found = (_smp_arch(state, input_path, None) if fmt == 'smp'
                 else infer_arch(fmt, state, input_path))
      except ConversionError:
        pass
    if found is not None and found.name != arch.name:
      raise ConversionError(
          f'{e}; the file looks like {found.name}, not --arch={arch_name}'
          ) from e
    raise

  count = sum(int(np.prod(v.shape)) for k, v in
              traverse_util.flatten_dict(variables).items()
              if k[0] == 'params')
  kind = 'network' if fmt == 'smp' else 'backbone'
  info = {
      'kind': kind,
      'source': {'format': fmt, 'file': os.path.abspath(input_path),
                 'arch': arch.name, 'read_as': note},
      'model': arch.model_fields(),
      'num_arrays': len(targets),
      'num_parameters': count,
  }
  meta = None
  if kind == 'network':
    info['num_classes'] = arch.num_classes
    meta = dataset_meta(arch.num_classes)
  write_checkpoint(output, variables, info, config, meta)

  dropped_text = _describe_dropped(dropped, heads)
  lines = [
      f'Read {input_path} ({note}): {fmt} {arch.name} ({how}).',
      f'Wrote {output}: {len(targets)} arrays, {count:,} parameters '
      f'({"the whole network" if kind == "network" else "backbone only"})'
      f'{dropped_text}.',
  ]
  if kind == 'network':
    lines.append(
        f'{arch.num_classes} classes, decoder width {arch.decoder_channels}. '
        f'Evaluate with: python -m pan_jax.evaluate --checkpoint={output} '
        '--data_dir=DATA')
  else:
    lines.append(
        'Train from it with: python -m pan_jax.main --config=configs/voc.py '
        f'--workdir=RUN --config.model.init_from={output} '
        f'{pretrained.required_overrides(info)}')
  return '\n'.join(lines)


def _describe_dropped(dropped: Sequence[str], heads: Sequence[str]) -> str:
  counters = [k for k in dropped if k.endswith('num_batches_tracked')]
  others = [k for k in dropped if k not in counters]
  parts = []
  if counters:
    parts.append(f'{len(counters)} num_batches_tracked counters')
  if others:
    parts.append(f'the ImageNet classifier ({", ".join(others)})')
  if heads:
    parts.append(f'{len(heads)} decode_head/auxiliary_head tensors of the '
                 'mmseg segmentation head')
  return '; dropped ' + ', '.join(parts) if parts else ''


def _define_flags() -> None:
  """The command's flags (defined when run as a program, as every command)."""
  flags.DEFINE_enum('format', None, FORMATS, 'Library the file comes from.')
  flags.DEFINE_string('input', None, '.pth / .pt / .safetensors file.')
  flags.DEFINE_string('output', None, 'Directory to create.')
  flags.DEFINE_string(
      'arch', None, 'Architecture, e.g. resnet101, resnet101d (timm), '
      'resnet101_v1c (mmseg); default: inferred from the keys.')


def main(argv: Sequence[str]) -> None:
  """Converts --input into --output (see the module docstring)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  flag_values = flags.FLAGS
  for name in ('format', 'input', 'output'):
    if not flag_values[name].value:
      raise app.UsageError(f'--{name} is required')
  if not flag_values['verbosity'].present:
    # The summary is what matters; INFO lines would bury it.
    logging.set_verbosity(logging.WARNING)
  try:
    print(convert(flag_values.format, flag_values.input, flag_values.output,
                  flag_values.arch))
  except ConversionError as e:
    sys.exit(f'pan_jax.convert: error: {e}')


if __name__ == '__main__':
  _define_flags()
  runtime.run(main)
