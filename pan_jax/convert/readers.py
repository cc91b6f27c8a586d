"""Reads PyTorch weight files: .pth/.pt through torch, .safetensors directly.

A raw state dict and the usual wrappers ({'state_dict': ...} from mmseg/mmcv
and timm's trainer, {'model': ...} from torchvision's references) are
accepted, and DataParallel's 'module.' prefix is stripped. torch is needed
only for .pth files, and never runs pickled code (`weights_only=True`);
.safetensors files are read by the safetensors library (a dependency of
pan_jax: small, no torch), memory-mapped.
"""

import json
import os
import re
import struct
from typing import Any, Dict, Mapping, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
import safetensors

from pan_jax import errors

# safetensors dtype -> numpy dtype: those the library's numpy reader makes
# (bfloat16 through ml_dtypes, which jax registers with numpy). Its float8
# types have no numpy reader; weights are not stored in them.
SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': jnp.bfloat16, 'I64': np.int64, 'I32': np.int32, 'I16': np.int16,
    'I8': np.int8, 'U64': np.uint64, 'U32': np.uint32, 'U16': np.uint16,
    'U8': np.uint8, 'BOOL': np.bool_,
}

# Entries of a checkpoint dict that hold the state dict, in order of
# preference (mmcv/mmseg and timm's trainer: 'state_dict'; torchvision's
# reference scripts: 'model').
WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict', 'net')

class ConversionError(errors.UserError, ValueError):
  """A file that cannot be converted; the message names the key or field."""


def read_state_dict(path: str) -> Tuple[Dict[str, np.ndarray], str]:
  """Reads a PyTorch state dict from .pth/.pt (torch) or .safetensors.

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
  """Reads a .safetensors file with the safetensors library (memory-mapped).

  The format: an 8-byte little-endian header length N, N bytes of JSON
  ({name: {dtype, shape, data_offsets}, '__metadata__': ...}), then the
  tensors' bytes. The header is checked here first (reading only it), so a
  truncated or corrupted file is reported by the tensor it breaks, which the
  library's own errors do not say; the tensors are then read by the library
  from its memory map, one at a time.

  Args:
    path: the file.

  Returns:
    name -> array (floating point, bfloat16 included, as float32).

  Raises:
    ConversionError: a truncated or malformed file, naming the tensor.
  """
  names = _check_safetensors_header(path)
  state = {}
  try:
    with safetensors.safe_open(path, framework='numpy') as f:
      for name in names:
        state[name] = _to_numpy_dtype(f.get_tensor(name))
  except safetensors.SafetensorError as e:  # What the check above let pass.
    raise ConversionError(f'{path}: not a valid safetensors file: {e}') from e
  return state


def _check_safetensors_header(path: str) -> Sequence[str]:
  """The tensor names of a .safetensors file whose header fits the file."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    start = f.read(8)
    if len(start) < 8:
      raise ConversionError(f'{path}: not a safetensors file ({size} bytes)')
    (header_size,) = struct.unpack('<Q', start)
    if 8 + header_size > size:
      raise ConversionError(
          f'{path}: truncated or not a safetensors file (its header claims '
          f'{header_size} bytes, the file has {size} in all)')
    text = f.read(header_size)
  try:
    header = json.loads(text)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f'{path}: unreadable safetensors header: {e}') from e
  if not isinstance(header, dict):
    raise ConversionError(f'{path}: the safetensors header is not a mapping')
  body = size - 8 - header_size
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    try:
      code = entry['dtype']
      shape = tuple(int(d) for d in entry['shape'])
      begin, end = (int(o) for o in entry['data_offsets'])
    except (KeyError, TypeError, ValueError) as e:
      raise ConversionError(
          f'{path}: tensor {name!r} has a malformed header entry {entry!r}'
          ) from e
    if code not in SAFETENSORS_DTYPES:
      raise ConversionError(
          f'{path}: tensor {name!r} has dtype {code!r}; pan_jax reads '
          f'{", ".join(SAFETENSORS_DTYPES)} (save the weights as float32)')
    dtype = np.dtype(SAFETENSORS_DTYPES[code])
    want = int(np.prod(shape)) * dtype.itemsize
    if not 0 <= begin <= end:
      raise ConversionError(
          f'{path}: tensor {name!r} has invalid data offsets {begin}..{end}: '
          'the file is corrupted')
    if end > body:
      raise ConversionError(
          f'{path}: tensor {name!r} (shape {shape}) lies at bytes '
          f'{begin}..{end} of the data, but the file has only {body}: '
          'the file is truncated')
    if end - begin != want:
      raise ConversionError(
          f'{path}: tensor {name!r} has {end - begin} bytes for shape {shape} '
          f'{code} ({want} expected): the file is corrupted')
  return [name for name in header if name != '__metadata__']


def _to_numpy_dtype(array: np.ndarray) -> np.ndarray:
  """A writable copy; floating point (incl. bfloat16) as float32."""
  if np.issubdtype(array.dtype, np.floating) or array.dtype == jnp.bfloat16:
    return np.array(array, np.float32)
  return np.array(array)


def _read_torch(path: str) -> Tuple[Dict[str, np.ndarray], str]:
  """torch.load(weights_only=True) and unwrapping."""
  _check_torch_file(path)  # A damaged file is named so, torch or not.
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
    # weights_only refuses a pickled object that is not a tensor ("Unsupported
    # global"); a truncated or corrupted file raises RuntimeError, EOFError or
    # an UnpicklingError whose text also mentions weights_only. Either way,
    # say which file and which of the two it is.
    text = str(e).strip()
    detail = text.splitlines()[0] if text else type(e).__name__
    pickled = re.search(r'Unsupported global: GLOBAL (\S+)', text)
    if pickled:
      detail = f'it holds a pickled {pickled.group(1)}'
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


# torch.save writes a zip archive; before PyTorch 1.6 it wrote a pickle
# (protocol 2: first byte 0x80).
_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_MAGIC = b'\x80'


def _check_torch_file(path: str) -> None:
  """ConversionError unless `path` starts like a file torch.save writes."""
  with open(path, 'rb') as f:
    head = f.read(8)
  if not head:
    raise ConversionError(f'{path} is empty (0 bytes): not a PyTorch '
                          'checkpoint')
  if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
    raise ConversionError(
        f'{path} is not a PyTorch checkpoint: torch.save writes a zip archive '
        f'(or, before PyTorch 1.6, a pickle), but the file starts with bytes '
        f'{head.hex(" ")}. Is it another format, or damaged?')


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
