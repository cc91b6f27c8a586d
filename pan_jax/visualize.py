"""Pictures of predictions: palette masks, overlays, a confusion-matrix chart.

PIL only (no matplotlib). Palettes come from the dataset's metadata
(`DatasetMeta.palette`: one (r, g, b) per class); the ignore label (255) is
drawn black in colour masks and marked in IGNORE_COLOR in overlays. Overlays
leave the photo bare where the class is background (`background_ids`): VOC's
black background blended over the whole photo would darken it. Text uses
PIL's built-in font (ImageFont.load_default), so nothing is downloaded.
Every file is written atomically, locally or on gs:// (paths.write_bytes),
so a reader never sees half a PNG.
"""

import io
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from pan_jax import paths

Palette = Sequence[Tuple[int, int, int]]
# Ignored pixels (label 255) in overlays: VOC's colour for its void label.
IGNORE_COLOR = (224, 224, 192)
# Class names whose pixels overlays leave as the photo.
BACKGROUND_NAMES = ('background', '_background_', 'bg')
# Height of a caption strip above each pane of a captioned panel.
_CAPTION = 16
# Size of a legend swatch, and the legend's line height.
_SWATCH = 10
_LEGEND_LINE = 16


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


def background_ids(class_names: Sequence[str]) -> Tuple[int, ...]:
  """Ids of the classes named background (BACKGROUND_NAMES), e.g. VOC's 0."""
  return tuple(k for k, name in enumerate(class_names)
               if str(name).lower() in BACKGROUND_NAMES)


def overlay(image: np.ndarray, mask: np.ndarray, palette: Palette,
            alpha: float = 0.5, ignore_label: int = 255,
            transparent: Sequence[int] = ()) -> np.ndarray:
  """Blends the colour mask over the image.

  Args:
    image: uint8 RGB [H, W, 3].
    mask: int [H, W] class ids.
    palette: one (r, g, b) per class.
    alpha: weight of the mask colour.
    ignore_label: ids drawn in IGNORE_COLOR (marked, not blended).
    transparent: class ids shown as the bare image (`background_ids`).

  Returns:
    uint8 RGB [H, W, 3].
  """
  image = np.asarray(image, np.float32)
  mask = np.asarray(mask)
  colors = colorize(mask, palette).astype(np.float32)
  blended = (1 - alpha) * image + alpha * colors
  bare = np.isin(mask, np.asarray(tuple(transparent), np.int64))
  blended = np.where(bare[..., None], image, blended)
  blended = np.where((mask == ignore_label)[..., None],
                     np.asarray(IGNORE_COLOR, np.float32), blended)
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


def present_classes(masks: Sequence[np.ndarray],
                    num_classes: int) -> List[int]:
  """The class ids in [0, num_classes) that occur in any of `masks`, sorted."""
  found = set()
  for mask in masks:
    ids = np.unique(np.asarray(mask))
    found.update(int(k) for k in ids if 0 <= k < num_classes)
  return sorted(found)


def captioned_panel(images: Sequence[np.ndarray], captions: Sequence[str],
                    legend: Sequence[Tuple[str, Tuple[int, int, int]]] = (),
                    gap: int = 4) -> np.ndarray:
  """`panel` with a caption above each pane and a colour legend below.

  Args:
    images: uint8 RGB [H, W, 3] panes of one height.
    captions: one line of text per pane.
    legend: (name, (r, g, b)) entries, drawn as swatch + name, wrapped into
      lines as wide as the panel.
    gap: white columns between panes.

  Returns:
    uint8 RGB [_CAPTION + H + legend lines * _LEGEND_LINE, W, 3]: the panes
    sit at rows [_CAPTION, _CAPTION + H), unchanged.
  """
  if len(captions) != len(images):
    raise ValueError(f'{len(images)} panes but {len(captions)} captions')
  body = panel(images, gap)
  font = ImageFont.load_default()
  width = body.shape[1]
  # Lay the legend out first: its height depends on the wrapping.
  placed, x, line = [], 4, 0
  for name, color in legend:
    entry = _SWATCH + 4 + int(font.getlength(str(name))) + 12
    if x > 4 and x + entry > width:
      x, line = 4, line + 1
    placed.append((x, line, str(name), tuple(int(c) for c in color)))
    x += entry
  lines = line + 1 if placed else 0
  top = _CAPTION
  canvas = Image.new('RGB', (width, top + body.shape[0] + lines *
                             _LEGEND_LINE), 'white')
  canvas.paste(Image.fromarray(body), (0, top))
  draw = ImageDraw.Draw(canvas)
  x = 0
  for image, caption in zip(images, captions):
    draw.text((x + 2, 2), str(caption), fill='black', font=font)
    x += image.shape[1] + gap
  base = top + body.shape[0]
  for x, line, name, color in placed:
    y = base + line * _LEGEND_LINE + (_LEGEND_LINE - _SWATCH) // 2
    draw.rectangle((x, y, x + _SWATCH - 1, y + _SWATCH - 1), fill=color,
                   outline=(96, 96, 96) if color == (255, 255, 255) else None)
    draw.text((x + _SWATCH + 4, y - 1), name, fill='black', font=font)
  return np.asarray(canvas)


def comparison(image: np.ndarray, label: Optional[np.ndarray],
               prediction: np.ndarray, class_names: Sequence[str],
               palette: Palette, ignore_label: int = 255,
               title: str = '') -> np.ndarray:
  """image | ground truth | prediction, captioned, with a legend.

  The legend names the classes present in the ground truth or the
  prediction (and 'ignore' where the ground truth has ignored pixels);
  background, left as the photo, gets an empty swatch.

  Args:
    image: uint8 RGB [H, W, 3].
    label: int [H, W] ground truth, or None (a split without labels: two
      panes).
    prediction: int [H, W] predicted ids.
    class_names: K names.
    palette: K colours.
    ignore_label: the ground truth's ignore value.
    title: the first pane's caption (e.g. the file name).

  Returns:
    uint8 RGB image (captioned_panel's layout).
  """
  transparent = background_ids(class_names)
  panes = [np.asarray(image, np.uint8)]
  captions = [title or 'image']
  masks = [prediction]
  if label is not None:
    panes.append(overlay(image, label, palette, ignore_label=ignore_label,
                         transparent=transparent))
    captions.append('ground truth')
    masks.insert(0, label)
  panes.append(overlay(image, prediction, palette, ignore_label=ignore_label,
                       transparent=transparent))
  captions.append('prediction')
  # Background is left as the photo: its swatch is an empty (white) box.
  legend = [(class_names[k],
             (255, 255, 255) if k in transparent else tuple(palette[k]))
            for k in present_classes(masks, len(class_names))]
  if label is not None and np.any(np.asarray(label) == ignore_label):
    legend.append(('ignore', IGNORE_COLOR))
  return captioned_panel(panes, captions, legend)


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
                    cell: int = 28) -> np.ndarray:
  """Renders a row-normalised confusion matrix with class names.

  Row t shows how the ground-truth pixels of class t were predicted
  (white = 0, dark blue = 100%), with the percentage written in every
  non-empty cell; the diagonal is each class's accuracy. Class names label
  the rows (left) and the columns (top, written vertically).

  Args:
    confusion: [K, K] counts, rows ground truth, columns prediction.
    class_names: K names.
    cell: pixels per matrix cell (at least what '100' needs).

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
  cell = max(cell, int(font.getlength('100')) + 6)
  names = [str(name) for name in class_names]
  title = 'rows: ground truth, columns: prediction (% of each row)'
  label_width = max(int(font.getlength(n)) for n in names) + 8
  size = num_classes * cell
  # Column names are written vertically above the matrix, under the title.
  header = label_width
  top = 16 + header
  width = max(label_width + size, int(font.getlength(title)) + 8) + 8
  image = Image.new('RGB', (width, top + size + 8), 'white')
  draw = ImageDraw.Draw(image)
  draw.text((4, 2), title, fill='black', font=font)
  column_names = Image.new('RGB', (header, size), 'white')
  column_draw = ImageDraw.Draw(column_names)
  for k, name in enumerate(names):
    y = top + k * cell + (cell - 10) // 2
    draw.text((4, y), name, fill='black', font=font)
    # Right-aligned, so that every name ends next to the matrix.
    column_draw.text((header - 4 - int(font.getlength(name)),
                      k * cell + (cell - 10) // 2), name, fill='black',
                     font=font)
  image.paste(column_names.rotate(90, expand=True), (label_width, 16))
  for t in range(num_classes):
    for p in range(num_classes):
      value = rates[t, p]
      # White -> dark blue; diagonal cells get a thin outline.
      color = tuple(int(round(255 + (c - 255) * value)) for c in (8, 48, 107))
      x0, y0 = label_width + p * cell, top + t * cell
      draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=color,
                     outline=(160, 160, 160) if t == p else None)
      if confusion[t, p] > 0:
        percent = 100 * value
        text = f'{percent:.0f}' if percent >= 1 else '<1'
        text_width = font.getlength(text)
        draw.text((x0 + (cell - text_width) / 2, y0 + (cell - 10) // 2 - 1),
                  text, fill='white' if value > 0.5 else 'black', font=font)
  return np.asarray(image)
