"""Pictures of predictions: palette masks, overlays, a confusion-matrix chart.

PIL only (no matplotlib). Palettes come from the dataset's metadata
(`DatasetMeta.palette`: one (r, g, b) per class); the ignore label (255) is
drawn black in colour masks and left uncoloured in overlays. Every file is
written atomically, locally or on gs:// (paths.write_bytes), so a reader
never sees half a PNG.
"""

import io
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from pan_jax import paths

Palette = Sequence[Tuple[int, int, int]]


def palette_array(palette: Palette) -> np.ndarray:
  """The palette as uint8 [256, 3]; entries past the classes are black.

  Args:
    palette: one (r, g, b) per class, at most 256.

  Returns:
    uint8 [256, 3] lookup table indexed by class id.
  """
  table = np.zeros((256, 3), np.uint8)
  colors = np.asarray(palette, np.int64).reshape(-1, 3)
  if len(colors) > 256 or colors.min(initial=0) < 0 or colors.max(
      initial=0) > 255:
    raise ValueError(
        f'palette must have at most 256 (r, g, b) entries in [0, 255], got '
        f'{len(colors)} entries in [{colors.min(initial=0)}, '
        f'{colors.max(initial=0)}]')
  table[:len(colors)] = colors
  return table


def colorize(mask: np.ndarray, palette: Palette) -> np.ndarray:
  """Class ids [H, W] -> uint8 RGB [H, W, 3] (ignore / unknown ids black)."""
  return palette_array(palette)[np.asarray(mask).astype(np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: Palette,
            alpha: float = 0.5, ignore_label: int = 255) -> np.ndarray:
  """Blends the colour mask over the image.

  Args:
    image: uint8 RGB [H, W, 3].
    mask: int [H, W] class ids.
    palette: one (r, g, b) per class.
    alpha: weight of the mask colour.
    ignore_label: ids shown as the bare image.

  Returns:
    uint8 RGB [H, W, 3].
  """
  image = np.asarray(image, np.float32)
  colors = colorize(mask, palette).astype(np.float32)
  blended = (1 - alpha) * image + alpha * colors
  blended = np.where((np.asarray(mask) == ignore_label)[..., None], image,
                     blended)
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def panel(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
  """Puts uint8 RGB images [H, W, 3] of one height side by side, white gaps."""
  height = images[0].shape[0]
  parts = []
  for i, image in enumerate(images):
    if image.shape[0] != height:
      raise ValueError(f'panel images must share a height, got '
                       f'{[im.shape[0] for im in images]}')
    if i:
      parts.append(np.full((height, gap, 3), 255, np.uint8))
    parts.append(image)
  return np.concatenate(parts, axis=1)


def save_png(path: str, array: np.ndarray,
             palette: Optional[Palette] = None) -> None:
  """Writes a PNG atomically (see the module docstring).

  Args:
    path: destination (local or gs://).
    array: uint8 [H, W] (single channel) or [H, W, 3] (RGB).
    palette: with a single-channel array, store it as a palette ('P') PNG
      whose pixel values stay the class ids (the VOC SegmentationClass
      format: PIL reads ids back, viewers show colours).
  """
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'{path}: PNG data must be uint8, got {array.dtype}')
  image = Image.fromarray(array)
  if palette is not None:
    if array.ndim != 2:
      raise ValueError(f'{path}: a palette PNG needs [H, W] ids, got shape '
                       f'{array.shape}')
    image = image.convert('P')
    image.putpalette(palette_array(palette).reshape(-1).tolist())
  encoded = io.BytesIO()
  image.save(encoded, format='PNG')
  paths.write_bytes(path, encoded.getvalue())


def confusion_image(confusion: np.ndarray, class_names: Sequence[str],
                    cell: int = 20) -> np.ndarray:
  """Renders a row-normalised confusion matrix with class names.

  Row t shows how the ground-truth pixels of class t were predicted
  (white = 0, dark blue = 1); the diagonal is each class's accuracy.

  Args:
    confusion: [K, K] counts, rows ground truth, columns prediction.
    class_names: K names.
    cell: pixels per matrix cell.

  Returns:
    uint8 RGB [H, W, 3] image.
  """
  confusion = np.asarray(confusion, np.float64)
  num_classes = confusion.shape[0]
  if confusion.shape != (num_classes, num_classes) or len(
      class_names) != num_classes:
    raise ValueError(f'confusion matrix {confusion.shape} does not match '
                     f'{len(class_names)} class names')
  totals = confusion.sum(axis=1, keepdims=True)
  rates = np.divide(confusion, totals, out=np.zeros_like(confusion),
                    where=totals > 0)
  font = ImageFont.load_default()
  names = [f'{k} {name}' for k, name in enumerate(class_names)]
  title = 'rows: ground truth, columns: prediction (row-normalised)'
  label_width = max(int(font.getlength(n)) for n in names) + 8
  size = num_classes * cell
  # Room for row labels on the left, a title and column numbers on top.
  top = 16 + 14
  width = max(label_width + size, int(font.getlength(title)) + 8) + 8
  image = Image.new('RGB', (width, top + size + 8), 'white')
  draw = ImageDraw.Draw(image)
  draw.text((4, 2), title, fill='black', font=font)
  for k, name in enumerate(names):
    y = top + k * cell + (cell - 10) // 2
    draw.text((4, y), name, fill='black', font=font)
    draw.text((label_width + k * cell + 2, 16), str(k % 100), fill='black',
              font=font)
  for t in range(num_classes):
    for p in range(num_classes):
      value = rates[t, p]
      # White -> dark blue; diagonal cells get a thin outline.
      color = tuple(int(round(255 + (c - 255) * value)) for c in (8, 48, 107))
      x0, y0 = label_width + p * cell, top + t * cell
      draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=color,
                     outline=(200, 200, 200) if t == p else None)
  return np.asarray(image)
