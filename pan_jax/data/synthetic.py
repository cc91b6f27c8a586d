"""A procedural shapes dataset: the demo's default data, no download needed.

Each image is a textured background (colour gradient, smooth blotches,
stripes, pixel noise, thin clutter lines) with 1-5 filled shapes of five
classes - circle, square, triangle, cross, star - told apart by SHAPE only:
every object gets a random colour and texture from the same distribution as
the background, and a random rotation. Objects range from small (~12% of the
shorter side across) to half the image, overlap, and may be cut by the
border; image sides vary from 96 to 160 pixels. As in VOC, a 255 (ignore) band
two pixels wide runs along every object boundary.

`write_voc_tree` writes the set in VOC layout (JPEG images, palette PNG
masks, ImageSets lists) so that prepare builds it through the same code path
as VOC (voc.scan). `render` is also the in-memory 'fake' dataset of the tests
(sources.py). Everything is a deterministic function of (seed, split, index).
"""

import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image
from PIL import ImageDraw

from pan_jax.data import records
from pan_jax.data import voc

CLASS_NAMES = ('background', 'circle', 'square', 'triangle', 'cross', 'star')
NUM_CLASSES = len(CLASS_NAMES)
# Split name -> code mixed into the seed, so each split's images do not
# depend on the other split's size.
SPLIT_CODES = {'train': 1, 'val': 2}
MIN_SIDE, MAX_SIDE = 96, 160
# Object diameter as a fraction of the shorter image side.
MIN_DIAMETER, MAX_DIAMETER = 0.12, 0.5
MAX_OBJECTS = 5
_MIN_CONTRAST = 70.0  # RGB distance between an object and what is under it.
_PARAMS_FILE = 'synthetic.json'


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator that renders example `index` of `split`."""
  return np.random.default_rng([seed, SPLIT_CODES[split], index])


def render(rng: np.random.Generator, height: int = 0, width: int = 0):
  """Renders one example.

  Args:
    rng: source of randomness (example_rng).
    height, width: image size; 0 draws it from [MIN_SIDE, MAX_SIDE].

  Returns:
    (image uint8 [H, W, 3], label uint8 [H, W] with ids 0..5 and 255 on
    object boundaries).
  """
  height = height or int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
  width = width or int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
  image = _texture(rng, height, width, strength=1.0)  # [H, W, 3] float
  _draw_clutter(rng, image)
  label = np.zeros((height, width), np.uint8)
  side = min(height, width)
  for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
    class_id = int(rng.integers(1, NUM_CLASSES))
    # Log-uniform size: as many small objects as large ones.
    radius = side * np.exp(rng.uniform(np.log(MIN_DIAMETER),
                                       np.log(MAX_DIAMETER))) / 2
    # At least about half of the object lies inside the image.
    centre = (rng.uniform(0.3 * radius, width - 0.3 * radius),
              rng.uniform(0.3 * radius, height - 0.3 * radius))
    mask = _shape_mask(CLASS_NAMES[class_id], height, width, centre, radius,
                       rng.uniform(0, 2 * np.pi))
    rows, cols = np.nonzero(mask)
    if not rows.size:
      continue
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    inside = mask[box]  # [h, w] over the object's bounding box
    fill = _texture(rng, inside.shape[0], inside.shape[1], strength=0.6,
                    colour=_contrasting_colour(rng, image[mask].mean(axis=0)))
    image[box][inside] = fill[inside]
    label[mask] = class_id
  label[_boundaries(label)] = records.IGNORE_LABEL
  image += rng.normal(0, rng.uniform(2, 8), image.shape)
  return np.clip(image + 0.5, 0, 255).astype(np.uint8), label


def _texture(rng, height, width, strength, colour=None):
  """Colour + gradient + smooth blotches + maybe stripes, float [H, W, 3]."""
  colour = rng.uniform(0, 255, 3) if colour is None else colour
  other = np.clip(colour + rng.normal(0, 60 * strength, 3), 0, 255)
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = xs * np.cos(angle) + ys * np.sin(angle)
  ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1.0)  # [H, W] in 0..1
  image = colour + ramp[..., None] * (other - colour)
  image += _smooth_noise(rng, height, width) * (25 * strength)
  if rng.random() < 0.5:
    period = rng.uniform(4, 14)
    angle = rng.uniform(0, np.pi)
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) * (2 * np.pi / period)
    image += (np.sin(phase)[..., None] * rng.uniform(8, 25) * strength *
              rng.choice([-1.0, 1.0], 3))
  return image.astype(np.float32)


def _smooth_noise(rng, height, width):
  """Bilinearly upsampled coarse Gaussian noise, float [H, W, 3]."""
  cells = int(rng.integers(2, 7))
  grid = rng.normal(0, 1, (cells + 1, cells + 1, 3))
  y = np.linspace(0, cells, height, dtype=np.float32)
  x = np.linspace(0, cells, width, dtype=np.float32)
  y0 = np.minimum(y.astype(int), cells - 1)
  x0 = np.minimum(x.astype(int), cells - 1)
  fy = (y - y0)[:, None, None]
  fx = (x - x0)[None, :, None]
  top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
  bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def _draw_clutter(rng, image):
  """Thin lines and arcs of background: 'not plain background' != object."""
  height, width = image.shape[:2]
  canvas = Image.new('L', (width, height))
  draw = ImageDraw.Draw(canvas)
  for _ in range(int(rng.integers(0, 4))):
    points = [(rng.uniform(0, width), rng.uniform(0, height))
              for _ in range(int(rng.integers(2, 5)))]
    canvas.paste(0, (0, 0, width, height))
    draw.line(points, fill=1, width=int(rng.integers(1, 3)))
    mask = np.asarray(canvas, bool)
    image[mask] = _contrasting_colour(rng, image[mask].mean(axis=0)
                                      if mask.any() else np.zeros(3))


def _contrasting_colour(rng, under):
  """A random colour at least _MIN_CONTRAST away from `under`."""
  for _ in range(20):
    colour = rng.uniform(0, 255, 3)
    if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
      return colour
  return 255.0 - under


def _shape_mask(shape, height, width, centre, radius, angle):
  """bool [H, W]: a filled shape of circumradius `radius`."""
  canvas = Image.new('L', (width, height))
  draw = ImageDraw.Draw(canvas)
  cx, cy = centre
  if shape == 'circle':
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius),
                 fill=1)
  else:
    draw.polygon(_polygon(shape, cx, cy, radius, angle), fill=1)
  return np.asarray(canvas, bool)


def _polygon(shape, cx, cy, radius, angle):
  """Vertices (x, y) of a polygonal shape."""
  if shape == 'square':
    radii, count = [radius], 4
  elif shape == 'triangle':
    radii, count = [radius], 3
  elif shape == 'star':
    radii, count = [radius, 0.42 * radius], 10
  elif shape == 'cross':
    # A plus sign with arms 0.44 * radius wide, rotated by `angle`.
    half = 0.22 * radius
    corners = [(half, radius), (-half, radius), (-half, half),
               (-radius, half), (-radius, -half), (-half, -half),
               (-half, -radius), (half, -radius), (half, -half),
               (radius, -half), (radius, half), (half, half)]
    cos, sin = np.cos(angle), np.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos)
            for x, y in corners]
  else:
    raise ValueError(f'unknown shape {shape!r}')
  return [(cx + radii[i % len(radii)] * np.cos(angle + 2 * np.pi * i / count),
           cy + radii[i % len(radii)] * np.sin(angle + 2 * np.pi * i / count))
          for i in range(count)]


def _boundaries(label):
  """bool [H, W]: pixels with a differently labelled 4-neighbour."""
  edge = np.zeros(label.shape, bool)
  vertical = label[1:, :] != label[:-1, :]
  horizontal = label[:, 1:] != label[:, :-1]
  edge[1:, :] |= vertical
  edge[:-1, :] |= vertical
  edge[:, 1:] |= horizontal
  edge[:, :-1] |= horizontal
  return edge


def write_voc_tree(source_dir: str, *, seed: int = 0, num_train: int = 2000,
                   num_val: int = 300) -> str:
  """Writes the synthetic set in VOC layout under source_dir (if absent).

  Layout: source_dir/VOCdevkit/VOC2012/{JPEGImages/*.jpg,
  SegmentationClass/*.png, ImageSets/Segmentation/{train,val,trainval}.txt,
  synthetic.json}. The tree is written in a temporary folder and renamed into
  place, so a killed run leaves nothing that looks complete. If it already
  exists with the same parameters, nothing is done.

  Args:
    source_dir: where to write it.
    seed: the dataset seed.
    num_train, num_val: split sizes.

  Returns:
    The VOC2012 folder.

  Raises:
    ValueError: source_dir holds a VOC tree made otherwise.
  """
  params = {'seed': seed, 'num_train': num_train, 'num_val': num_val,
            'version': 1}
  final = os.path.join(source_dir, 'VOCdevkit')
  voc_root = os.path.join(final, 'VOC2012')
  if os.path.isdir(final):
    params_path = os.path.join(voc_root, _PARAMS_FILE)
    existing = None
    if os.path.isfile(params_path):
      with open(params_path) as f:
        existing = json.load(f)
    if existing != params:
      raise ValueError(
          f'{final} already exists and is not the synthetic set for {params} '
          f'(found {existing}); choose another --source_dir or delete it')
    return voc_root
  os.makedirs(source_dir, exist_ok=True)
  temp = tempfile.mkdtemp(prefix='.incomplete_synthetic_', dir=source_dir)
  try:
    temp_root = os.path.join(temp, 'VOCdevkit', 'VOC2012')
    for sub in ('JPEGImages', 'SegmentationClass',
                os.path.join('ImageSets', 'Segmentation')):
      os.makedirs(os.path.join(temp_root, sub))
    palette = [c for colour in voc.color_map(256) for c in colour]
    lists = {}
    for split, count in (('train', num_train), ('val', num_val)):
      lists[split] = []
      for index in range(count):
        name = f'{split}_{index:06d}'
        image, label = render(example_rng(seed, split, index))
        Image.fromarray(image).save(
            os.path.join(temp_root, 'JPEGImages', name + '.jpg'), quality=90)
        mask = Image.frombytes('P', label.shape[::-1], label.tobytes())
        mask.putpalette(palette)
        mask.save(os.path.join(temp_root, 'SegmentationClass', name + '.png'))
        lists[split].append(name)
    lists['trainval'] = lists['train'] + lists['val']
    for split, names in lists.items():
      with open(os.path.join(temp_root, 'ImageSets', 'Segmentation',
                             split + '.txt'), 'w') as f:
        f.write(''.join(name + '\n' for name in names))
    with open(os.path.join(temp_root, _PARAMS_FILE), 'w') as f:
      json.dump(params, f)
    os.rename(os.path.join(temp, 'VOCdevkit'), final)
  finally:
    shutil.rmtree(temp, ignore_errors=True)
  return voc_root
