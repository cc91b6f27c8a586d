r"""Converts PyTorch ResNet and smp PAN weights into pan_jax checkpoints.

The command is `python -m pan_jax.convert` (__main__.py); `convert()` below
is the same in Python.

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

  readers.py  .pth / .safetensors files -> NumPy state dicts
  archs.py    formats, architecture inference, the pan_jax targets
  keymaps.py  PyTorch key <-> pan_jax variable, the mapping itself

The output directory is described in pan_jax/checkpoints/pretrained.py.
Backbones are loaded for training with `--config.model.init_from=DIR` (plus
the `--config.model.*` overrides the summary prints); a converted smp model
is an inference checkpoint for `pan_jax.evaluate` / `pan_jax.predict`.
"""

import dataclasses
import os
from typing import Mapping, Optional, Sequence

from flax import traverse_util
import numpy as np

from pan_jax import paths
from pan_jax.checkpoints import pretrained
from pan_jax.convert import archs
from pan_jax.convert import keymaps
from pan_jax.convert import readers

# What convert() raises for a file it cannot convert (readers.py defines it).
ConversionError = readers.ConversionError


def _smp_arch(state: Mapping[str, np.ndarray], path: str,
              arch_name: Optional[str]) -> archs.Arch:
  if arch_name:
    base = archs.parse_arch('smp', arch_name)
  else:
    base = archs.infer_arch('smp', state, path)
  head = state['segmentation_head.0.weight']
  mid = state.get('decoder.fpa.mid.0.conv.weight')
  if mid is None:
    raise readers.ConversionError(
        f"missing key 'decoder.fpa.mid.0.conv.weight' in {path}: not an smp "
        'PAN (its FPA centre block)')
  return dataclasses.replace(base, num_classes=int(head.shape[0]),
                             decoder_channels=int(mid.shape[0]))


def convert(fmt: str, input_path: str, output: str,
            arch_name: Optional[str] = None) -> str:
  """Converts FILE into a pan_jax checkpoint directory.

  Args:
    fmt: one of archs.FORMATS.
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
  if fmt not in archs.FORMATS:
    raise readers.ConversionError(
        f'--format={fmt!r}; valid: {", ".join(archs.FORMATS)}')
  if paths.exists(output):
    raise readers.ConversionError(
        f'--output={paths.absolute(output)} already exists; choose a new '
        'directory or remove it')
  state, note = readers.read_state_dict(input_path)
  heads = []
  if fmt == 'mmseg' and any(k.startswith('backbone.') for k in state):
    state, heads = archs.split_mmseg(state)
    note += ", 'backbone.' prefix stripped"
  archs.check_format(fmt, state, input_path)

  if fmt == 'smp':
    arch = _smp_arch(state, input_path, arch_name)
    config = archs.smp_config(arch.backbone, arch.num_classes,
                              arch.decoder_channels)
  else:
    arch = (archs.parse_arch(fmt, arch_name) if arch_name
            else archs.infer_arch(fmt, state, input_path))
    config = None
  targets = archs.target_variables(fmt, arch)
  how = 'as stated by --arch' if arch_name else 'inferred from the keys'

  try:
    variables, dropped = keymaps.map_state_dict(fmt, arch, state, targets,
                                                input_path)
  except readers.ConversionError as e:
    # With --arch, say what the file looks like when that differs.
    found = None
    if arch_name:
      try:
        found = (_smp_arch(state, input_path, None) if fmt == 'smp'
                 else archs.infer_arch(fmt, state, input_path))
      except readers.ConversionError:
        pass
    if found is not None and found.name != arch.name:
      raise readers.ConversionError(
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
    meta = archs.dataset_meta(arch.num_classes)
  pretrained.save(output, variables, info, config, meta)

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
