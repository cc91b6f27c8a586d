"""Which PyTorch key fills which pan_jax variable, and the mapping itself.

Every tensor of the file is used exactly once. Only BatchNorm's
`num_batches_tracked` counters and the ImageNet classifier `fc.*` are
dropped; a missing or unexpected key, or a shape mismatch, is an error
naming the key and both shapes. PyTorch conv weights (OIHW) become flax
kernels (HWIO).
"""

import re
from typing import Any, Dict, List, Mapping, Tuple

from flax import traverse_util
import numpy as np

from pan_jax.convert import archs
from pan_jax.convert import readers

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

def _source_module(fmt: str, arch: archs.Arch,
                   path: Tuple[str, ...]) -> str:
  """The PyTorch module name of a pan_jax module path (without collection)."""
  if path[0] != 'backbone':
    if fmt != 'smp' or path not in SMP_HEAD_NAMES:
      raise readers.ConversionError(
          f'no {fmt} name for pan_jax module {"/".join(path)}')
    return SMP_HEAD_NAMES[path]
  prefix = archs.backbone_prefix(fmt)
  name = path[1]
  if name.startswith('stem_'):
    return prefix + archs.DEEP_STEM_NAMES[fmt][name]
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


def source_key(fmt: str, arch: archs.Arch,
               path: Tuple[str, ...]) -> str:
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


def map_state_dict(fmt: str, arch: archs.Arch,
                   state: Mapping[str, np.ndarray],
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
      raise readers.ConversionError(
          f'missing key {key!r} for {name} (shape {tuple(target.shape)}){hint}')
    value = state[key]
    shape = tuple(target.shape)
    if len(shape) == 4:
      # PyTorch conv weights are OIHW; flax kernels are HWIO.
      want = (shape[3], shape[2], shape[0], shape[1])
    else:
      want = shape
    if tuple(value.shape) != want:
      raise readers.ConversionError(
          f'key {key!r}: the file has shape {tuple(value.shape)}, {name} needs '
          f'{want}{hint}')
    if len(shape) == 4:
      value = value.transpose(2, 3, 1, 0)
    out[target_path] = np.ascontiguousarray(value, dtype=np.float32)
    used.add(key)
  dropped = [k for k in state if k not in used and _droppable(fmt, k)]
  unexpected = [k for k in state if k not in used and not _droppable(fmt, k)]
  if unexpected:
    raise readers.ConversionError(
        f'unexpected key {unexpected[0]!r} (shape '
        f'{tuple(state[unexpected[0]].shape)}): no pan_jax variable takes it; '
        f'{len(unexpected)} such keys in all{hint}')
  return traverse_util.unflatten_dict(out), dropped
