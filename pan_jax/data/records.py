"""Source image / label files -> checked, encoded records.

Every dataset ends up as records of three fields: the image (JPEG or PNG
bytes, RGB), the label (an 8-bit single-channel PNG of class ids, 255 =
ignore) and the file name. This module reads the source files, checks them
and encodes them; `builder.py` writes the records.

Checks, each failing with a `BadInputError` that names the file: the image
decodes completely (a truncated JPEG fails here, not in training); the label is
an 8-bit PNG of ids (palette or grayscale: RGB-coloured and 16-bit PNGs are
refused) or an SBD `.mat`; image and label have the same size; every label
value is a class id or an ignore value of the dataset.

The palette trap: VOC labels are palette PNGs whose pixel values ARE the class
ids. Only PIL returns those indices; TF / OpenCV decoders return the palette
colours (or their luminance). Labels are therefore decoded with PIL here and
stored as plain grayscale PNGs, which every decoder reads the same way.
"""

import dataclasses
import io
import os
from typing import Sequence

import numpy as np
from PIL import Image

from pan_jax import errors

IGNORE_LABEL = 255
# PNG signature (8) + IHDR length (4) + 'IHDR' (4) + width (4) + height (4).
_PNG_BIT_DEPTH_OFFSET = 24
_PNG_COLOUR_TYPE_RGB = 2


class BadInputError(errors.DataError):
  """A source file is not what the dataset needs.

  When one stops a build (prepare without --skip_bad), its message says
  that --skip_bad would skip it, unless skipping cannot help.

  Attributes:
    path: the offending file (or folder).
    problem: what is wrong and what was expected.
    skippable: whether skipping the example would help (False for a missing
      folder or an empty split).
  """

  def __init__(self, path: str, problem: str, skippable: bool = True):
    self.path = str(path)
    self.problem = problem
    self.skippable = skippable
    hint = (' (--skip_bad skips such examples and lists them at the end; '
            'nothing was written)' if skippable else '')
    super().__init__(f'{self.path}: {problem}{hint}')


@dataclasses.dataclass(frozen=True)
class LabelMapping:
  """How raw label values (0..255) become class ids.

  Attributes:
    table: 256 entries: the class id of each raw value, IGNORE_LABEL for
      values to ignore, or -1 for values that must not occur.
    expected: the allowed raw values in words, for error messages.
  """
  table: tuple[int, ...]
  expected: str

  @classmethod
  def identity(cls, num_classes: int,
               ignore_values: Sequence[int] = (IGNORE_LABEL,)):
    """Raw values 0..num_classes-1 are class ids; `ignore_values` -> 255."""
    table = [-1] * 256
    for value in range(num_classes):
      table[value] = value
    for value in ignore_values:
      table[value] = IGNORE_LABEL
    ignore_text = ', '.join(str(v) for v in ignore_values)
    return cls(tuple(table), f'class ids 0..{num_classes - 1} or the ignore '
               f'value {ignore_text}')

  def apply(self, raw: np.ndarray, path: str) -> np.ndarray:
    """Maps raw values to class ids.

    Args:
      raw: uint8 [H, W] raw label values.
      path: the label file, named in the error.

    Returns:
      uint8 [H, W] class ids, 255 = ignore.

    Raises:
      BadInputError: a value the table does not allow.
    """
    table = np.asarray(self.table, np.int16)
    mapped = table[raw]
    if (mapped < 0).any():
      bad = np.unique(raw[mapped < 0])
      shown = ', '.join(str(v) for v in bad[:10])
      more = ' ...' if len(bad) > 10 else ''
      raise BadInputError(
          path, f'label values {shown}{more} found; expected {self.expected}')
    return mapped.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ExampleFiles:
  """The source files of one example.

  Attributes:
    file_name: stored with the record (a stem such as '2007_000032').
    image_path: JPEG or PNG image.
    label_path: PNG of raw ids, or an SBD .mat when label_format is 'sbd_mat'
      ('' for 'none').
    label_format: 'png', 'sbd_mat', or 'none' for an image without labels (a
      benchmark's test split): its label is all IGNORE_LABEL.
  """
  file_name: str
  image_path: str
  label_path: str
  label_format: str = 'png'


def read_image(path: str) -> tuple[bytes, tuple[int, int]]:
  """Reads and checks an image; returns RGB JPEG/PNG bytes and (height, width).

  RGB JPEGs and 8-bit RGB PNGs are kept byte for byte (no re-compression).
  Grayscale, CMYK, RGBA, palette and 16-bit images are converted to 8-bit RGB
  and stored as PNG (lossless).

  Args:
    path: image file.

  Returns:
    (encoded bytes, (height, width)).

  Raises:
    BadInputError: missing, unreadable, truncated or not an image.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise BadInputError(path, f'cannot read the image ({e.strerror})') from e
  try:
    with Image.open(io.BytesIO(data)) as image:
      # load() decodes every pixel: a truncated file fails now.
      image.load()
      width, height = image.size
      if image.format in ('JPEG', 'MPO') and image.mode == 'RGB':
        return data, (height, width)
      if (image.format == 'PNG' and image.mode == 'RGB' and
          data[_PNG_BIT_DEPTH_OFFSET] == 8 and
          data[_PNG_BIT_DEPTH_OFFSET + 1] == _PNG_COLOUR_TYPE_RGB):
        return data, (height, width)
      rgb = _to_rgb(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadInputError(
        path, f'not a readable image, or truncated / corrupt ({e}); expected '
        'a complete JPEG or PNG') from e
  return encode_png(rgb), (height, width)


def _to_rgb(image: Image.Image) -> np.ndarray:
  """Any PIL image -> uint8 [H, W, 3]."""
  if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    # 16/32-bit grayscale: scale to 8 bits instead of clipping at 255.
    values = np.asarray(image, np.float64)
    top = 65535.0 if image.mode.startswith('I;16') else max(values.max(), 1.0)
    gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  return np.asarray(image.convert('RGB'))


def read_label(path: str, label_format: str = 'png') -> np.ndarray:
  """Reads raw label values as uint8 [H, W].

  Args:
    path: label file.
    label_format: 'png' (8-bit grayscale or palette PNG) or 'sbd_mat' (an SBD
      `cls/*.mat` file with the struct GTcls.Segmentation).

  Returns:
    uint8 [H, W] raw values (palette indices for palette PNGs).

  Raises:
    BadInputError: missing, unreadable, wrong format, RGB or 16-bit.
  """
  if label_format == 'sbd_mat':
    return _read_sbd_mat(path)
  if not os.path.isfile(path):
    raise BadInputError(path, 'label file not found')
  expected = ('expected an 8-bit PNG of class ids (grayscale or palette, one '
              'value per pixel)')
  try:
    with Image.open(path) as label:
      label.load()
      fmt, mode = label.format, label.mode
      if fmt != 'PNG':
        raise BadInputError(
            path, f'label is a {fmt} file; {expected} (lossy formats change '
            'the ids)')
      if mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        raise BadInputError(path, f'label is a 16/32-bit PNG (mode {mode}); '
                            f'{expected}')
      if mode in ('RGB', 'RGBA', 'LA', 'CMYK'):
        raise BadInputError(
            path, f'label is a colour PNG (mode {mode}); {expected}. Convert '
            'colours to class ids first (or save as a palette PNG)')
      if mode not in ('P', 'L', '1'):
        raise BadInputError(path, f'label has PIL mode {mode}; {expected}')
      # For 'P' this gives the palette INDICES (the class ids), not colours.
      return np.asarray(label).astype(np.uint8)
  except BadInputError:
    raise
  except (OSError, SyntaxError, ValueError) as e:
    raise BadInputError(
        path, f'not a readable PNG, or truncated / corrupt ({e}); '
        f'{expected}') from e


def _read_sbd_mat(path: str) -> np.ndarray:
  """Reads GTcls.Segmentation from an SBD cls/*.mat file."""
  import scipy.io  # pylint: disable=g-import-not-at-top  (only SBD needs it)
  if not os.path.isfile(path):
    raise BadInputError(path, 'SBD label file not found')
  try:
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
  except Exception as e:  # pylint: disable=broad-except  (scipy raises many)
    raise BadInputError(path, f'not a readable .mat file ({e})') from e
  try:
    segmentation = np.asarray(mat['GTcls'].Segmentation)
  except (KeyError, AttributeError) as e:
    raise BadInputError(
        path, 'expected an SBD cls .mat with a struct GTcls that has a field '
        'Segmentation') from e
  if (segmentation.ndim != 2 or not np.issubdtype(segmentation.dtype,
                                                  np.integer) or
      segmentation.min() < 0 or segmentation.max() > 255):
    raise BadInputError(
        path, f'GTcls.Segmentation is {segmentation.dtype} with shape '
        f'{segmentation.shape}; expected a 2-D array of class ids 0..255')
  return segmentation.astype(np.uint8)


def encode_png(array: np.ndarray) -> bytes:
  """uint8 [H, W] or [H, W, 3] -> PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(
      buffer, format='PNG', compress_level=3)
  return buffer.getvalue()


def make_record(example: ExampleFiles, mapping: LabelMapping):
  """Reads, checks and encodes one example.

  Args:
    example: its source files.
    mapping: raw label values -> class ids.

  Returns:
    (record, (height, width)) where record is {'image': bytes, 'label': PNG
    bytes of uint8 class ids, 'file_name': str}.

  Raises:
    BadInputError: any check above fails.
  """
  image, (height, width) = read_image(example.image_path)
  if example.label_format == 'none':
    # No ground truth (a test split): every pixel is ignored by the metrics.
    label = np.full((height, width), IGNORE_LABEL, np.uint8)
  else:
    raw = read_label(example.label_path, example.label_format)
    if raw.shape != (height, width):
      raise BadInputError(
          example.label_path,
          f'label is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image '
          f'{example.image_path} is {width}x{height}; expected the same size')
    label = mapping.apply(raw, example.label_path)
  record = {'image': image, 'label': encode_png(label),
            'file_name': example.file_name}
  return record, (height, width)


def try_make_record(example: ExampleFiles, mapping: LabelMapping):
  """make_record that returns the error instead of raising it (for pools).

  Returns:
    ('ok', record, size) or ('bad', path, problem).
  """
  try:
    record, size = make_record(example, mapping)
  except BadInputError as e:
    return 'bad', e.path, e.problem
  return 'ok', record, size
