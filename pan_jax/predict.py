"""Segments images: the Predictor, `load`, and `python -m pan_jax.predict`.

    python -m pan_jax.predict --checkpoint=RUN_OR_EXPORT --output=OUT
        IMAGE_OR_DIR... [--scales=...] [--flip] [--mode=whole|slide]
        [--config.x=y ...]

For each image (directories are searched, not recursively, for .jpg, .jpeg,
.png, .bmp, .tif, .tiff, .webp) it writes, at the image's own size:
  OUT/<stem>.png: class ids, single-channel 8-bit (255 never occurs);
  OUT/<stem>_color.png: the ids as a palette PNG in the dataset's colours;
  OUT/<stem>_overlay.png: the colours blended over the image.
A file that cannot be read gets an error naming it; the others are still
processed and the exit status is 1 at the end. Inputs inside OUT, or two
inputs whose PNGs would have the same name, are refused before anything is
written (exit status 2).

Images are padded to a canvas (config.eval.canvas_size when the image fits,
otherwise its size rounded up to a multiple of 32) and the model gets their
valid size, so the padding does not change the prediction and few canvas
shapes (compilations) occur. Inference options (scales, flip, whole / slide)
default to the checkpoint's config.eval.

In Python, `pan_jax.load(path)` (= `load` here) returns the Predictor:
`predictor(image)` gives the class ids of a uint8 RGB image, a list of
images or an [N, H, W, 3] array; `predictor.probabilities(...)` the scores.
"""

import functools
import os
import sys
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from PIL import Image

from pan_jax import checkpoints
from pan_jax import defaults
from pan_jax import errors
from pan_jax import inference
from pan_jax import models
from pan_jax import paths as paths_lib
from pan_jax import progress as progress_lib
from pan_jax import runtime
from pan_jax import visualize
from pan_jax.data import transforms

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
_CANVAS_MULTIPLE = 32


class Predictor:
  """Class ids for uint8 RGB images of any size, one jitted program per canvas.

  `pan_jax.load(path)` builds one from a checkpoint. Call it with one image
  (uint8 [H, W, 3]), a list of images of any sizes, or an array
  [N, H, W, 3]; `probabilities` takes the same and returns the averaged
  softmax scores. Images are padded to a canvas (see the module docstring)
  and run up to `batch_size` at a time; the batch is rounded up to a power
  of two so that few programs are compiled.

  Attributes:
    options: the InferenceOptions used (scales, flip, whole / slide).
    meta: the checkpoint's DatasetMeta (class names, palette), or None.
  """

  def __init__(self, model: Any, variables: Any,
               options: inference.InferenceOptions,
               canvas_size: Sequence[int] = (512, 512), min_size: int = 1,
               batch_size: int = 8, meta: Optional[Any] = None):
    """Builds the predictor.

    Args:
      model: linen Module (apply(variables, images, train=False,
        image_sizes=...)).
      variables: {'params', 'batch_stats'}.
      options: InferenceOptions.
      canvas_size: (height, width) used for every image that fits.
      min_size: smallest canvas side the model accepts
        (models.min_input_size).
      batch_size: most images per call of the compiled program.
      meta: DatasetMeta of the checkpoint (kept for the caller).
    """
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    self.options = options
    self.meta = meta
    self._canvas_size = tuple(int(s) for s in canvas_size)
    self._min_size = int(min_size)
    self._batch_size = int(batch_size)
    num_classes = getattr(model, 'num_classes', None)
    self._ids_dtype = (np.uint8 if num_classes is not None and
                       num_classes <= 256 else np.int32)
    self._variables = jax.device_put(
        {name: variables[name] for name in ('params', 'batch_stats')})
    self._predict = jax.jit(functools.partial(_predict, model, options))
    self._predict_probs = jax.jit(
        functools.partial(_predict_probs, model, options))
    # Each compiled per (function, canvas batch shape), before it first runs.
    self._compiled = {}

  @property
  def class_names(self) -> Tuple[str, ...]:
    """The name of every class id (from the checkpoint's dataset)."""
    if self.meta is None:
      raise ValueError('this Predictor was built without a DatasetMeta')
    return self.meta.class_names

  def __call__(self, images: Any) -> Any:
    """Class ids of one image or of a batch.

    Args:
      images: uint8 RGB [H, W, 3], a list of them (sizes may differ) or an
        array [N, H, W, 3].

    Returns:
      [H, W] class ids (uint8 for up to 256 classes, else int32), a list of
      them, or an array [N, H, W], matching `images`.
    """
    return self._run(self._predict, images,
                     lambda ids: ids.astype(self._ids_dtype))

  def probabilities(self, images: Any) -> Any:
    """Softmax probabilities averaged over the scales and flips.

    Args:
      images: as for `__call__`.

    Returns:
      float32 [H, W, K] per image (a list, or an array [N, H, W, K]); the
      class ids are their argmax.
    """
    return self._run(self._predict_probs, images, lambda probs: probs)

  def _run(self, function, images, finish):
    """`function` over canvases of up to batch_size images, cropped back."""
    batch, kind = _as_batch(images)
    by_canvas = {}
    for index, image in enumerate(batch):
      canvas = canvas_for(image.shape[0], image.shape[1], self._canvas_size,
                          self._min_size)
      by_canvas.setdefault(canvas, []).append(index)
    results = [None] * len(batch)
    for (canvas_h, canvas_w), indices in by_canvas.items():
      for first in range(0, len(indices), self._batch_size):
        chunk = indices[first:first + self._batch_size]
        count = min(self._batch_size, 1 << (len(chunk) - 1).bit_length())
        canvases = np.zeros((count, canvas_h, canvas_w, 3), np.float32)
        # Filler images (up to the rounded batch) get a whole valid canvas.
        sizes = np.tile(np.array([[canvas_h, canvas_w]], np.int32),
                        (count, 1))
        for row, index in enumerate(chunk):
          height, width = batch[index].shape[:2]
          canvases[row, :height, :width] = transforms.normalize(batch[index])
          sizes[row] = (height, width)
        key = (function, canvases.shape)
        if key not in self._compiled:
          self._compiled[key] = runtime.compile_then_release(
              function, self._variables, canvases, sizes)
        outputs = np.asarray(self._compiled[key](self._variables, canvases,
                                                 sizes))
        for row, index in enumerate(chunk):
          height, width = batch[index].shape[:2]
          results[index] = finish(outputs[row, :height, :width])
    if kind == 'one':
      return results[0]
    if kind == 'array':
      return np.stack(results)
    return results


def _as_batch(images: Any) -> Tuple[List[np.ndarray], str]:
  """(list of uint8 [H, W, 3] images, 'one' | 'list' | 'array')."""
  if isinstance(images, (list, tuple)):
    batch, kind = list(images), 'list'
  else:
    array = np.asarray(images)
    if array.ndim == 4:
      batch, kind = list(array), 'array'
    else:
      batch, kind = [array], 'one'
  for index, image in enumerate(batch):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      where = '' if kind == 'one' else f'image {index}: '
      raise ValueError(
          f'{where}expected uint8 RGB [H, W, 3] (e.g. np.asarray(PIL.Image'
          f'.open(f).convert("RGB"))), got {image.dtype} {image.shape}')
    batch[index] = image
  if not batch:
    raise ValueError('expected at least one image, got an empty list')
  return batch, kind


def canvas_for(height: int, width: int, canvas_size: Sequence[int],
               min_size: int = 1) -> Tuple[int, int]:
  """The canvas an image is padded to.

  Args:
    height: image height.
    width: image width.
    canvas_size: (height, width) used whenever the image fits.
    min_size: smallest side the model accepts.

  Returns:
    canvas_size if the image fits, else each side rounded up to a multiple
    of 32 (and at least min_size): few distinct shapes, few compilations.
  """
  if height <= canvas_size[0] and width <= canvas_size[1]:
    return tuple(canvas_size)
  return tuple(max(min_size, -(-side // _CANVAS_MULTIPLE) * _CANVAS_MULTIPLE)
               for side in (height, width))


def _predict(model, options, variables, images, image_sizes):
  return inference.predict(_apply_fn(model, variables), images, image_sizes,
                           options)


def _predict_probs(model, options, variables, images, image_sizes):
  return inference.predict_probs(_apply_fn(model, variables), images,
                                 image_sizes, options)


def _apply_fn(model, variables):
  def apply_fn(x, sizes):
    return model.apply(variables, x, train=False, image_sizes=sizes)
  return apply_fn


def load(path: str, *, step: Optional[int] = None,
         scales: Optional[Sequence[float]] = None,
         flip: Optional[bool] = None, mode: Optional[str] = None,
         batch_size: int = 8,
         config_overrides: Optional[Mapping[str, Any]] = None) -> Predictor:
  """The Predictor of a checkpoint (what `pan_jax.load` returns).

  Args:
    path: training workdir, inference checkpoint or converted network
      (checkpoints.load).
    step: checkpoint step of a workdir (None = the latest).
    scales: test-time scales (None = config.eval.scales).
    flip: average the mirrored image too (None = config.eval.flip).
    mode: 'whole' or 'slide' (None = config.eval.mode).
    batch_size: most images per compiled call.
    config_overrides: {dotted path: value} set on the saved config first,
      e.g. {'eval.canvas_size': (640, 640)}; the arguments above take
      precedence.

  Returns:
    A Predictor whose `meta` is the checkpoint's DatasetMeta.
  """
  config, meta, variables, _ = checkpoints.load(path, step)
  defaults.override(config, config_overrides or {})
  options = inference.InferenceOptions.from_config(
      config.eval, mode=mode, scales=scales, flip=flip,
      min_size=models.min_input_size(config))
  model = models.create_model(config, meta.num_classes)
  return Predictor(model, variables, options,
                   canvas_size=config.eval.canvas_size,
                   min_size=models.min_input_size(config),
                   batch_size=batch_size, meta=meta)


def find_images(paths: Sequence[str]) -> Tuple[List[str], List[str]]:
  """Expands directories into their image files.

  Args:
    paths: files (taken whatever their extension) and directories, local or
      gs://.

  Returns:
    (files, problems): files in the given order (each directory's sorted,
    a file named twice once), and a message for each path that does not
    exist.
  """
  files, problems = [], []
  for path in paths:
    if paths_lib.isdir(path):
      found = [
          os.path.join(path, name) for name in paths_lib.listdir(path)
          if name.lower().endswith(IMAGE_EXTENSIONS) and
          paths_lib.isfile(os.path.join(path, name))]
      if not found:
        problems.append(f'{path}: directory holds no image files '
                        f'({", ".join(IMAGE_EXTENSIONS)})')
      files.extend(found)
    elif paths_lib.exists(path):
      files.append(path)
    else:
      problems.append(f'{path}: no such file or directory')
  seen, unique = set(), []
  for path in files:
    if paths_lib.realpath(path) not in seen:
      seen.add(paths_lib.realpath(path))
      unique.append(path)
  return unique, problems


def read_image(path: str) -> np.ndarray:
  """uint8 RGB [H, W, 3]; raises ValueError naming the file if unreadable."""
  try:
    with paths_lib.open_file(path) as f, Image.open(f) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise errors.DataError(f'{path}: cannot read it as an image ({e})') from e


OUTPUT_SUFFIXES = ('', '_color', '_overlay')


def output_names(files: Sequence[str], output: str) -> List[str]:
  """The stem each input's PNGs are named after; refuses any clash.

  Checked before anything is written: no input lies in `output` (its PNGs
  could replace it, e.g. photo.png by the class ids of photo.png), and no
  two inputs give the same output file (x.png and x.jpg both give x.png;
  x_color.jpg gives x_color.png, the colour mask of x.png).

  Args:
    files: the input image files.
    output: the output directory.

  Returns:
    The stem of each file, in order.

  Raises:
    UsageError: naming the inputs and the output file they would share.
  """
  out = paths_lib.realpath(output)
  inside = [f for f in files
            if os.path.dirname(paths_lib.realpath(f)) == out]
  if inside:
    raise errors.UsageError(
        f'--output={output} holds the input {inside[0]}'
        f'{f" and {len(inside) - 1} more" if len(inside) > 1 else ""}: '
        'predictions written there could replace inputs. Choose another '
        '--output.')
  stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
  owner = {}
  for path, stem in zip(files, stems):
    for suffix in OUTPUT_SUFFIXES:
      name = f'{stem}{suffix}.png'
      if name in owner:
        raise errors.UsageError(
            f'{owner[name]} and {path} would both be written to '
            f'{os.path.join(output, name)} (predict writes <stem>.png, '
            '<stem>_color.png and <stem>_overlay.png per input). Rename one '
            'or predict them into separate --output folders; nothing was '
            'written.')
      owner[name] = path
  return stems


def predict_files(predictor: Predictor, paths: Sequence[str], output: str,
                  meta: Any, progress: bool = False) -> List[str]:
  """Writes the three PNGs of every image; returns the errors.

  Args:
    predictor: a Predictor.
    paths: image files and directories.
    output: output directory (local or gs://).
    meta: DatasetMeta (palette, ignore_label).
    progress: show a progress bar (progress.Bar: on a terminal, else one
      summary line).

  Returns:
    One message per path that failed (empty when all succeeded).

  Raises:
    UsageError: `output_names` refuses the inputs (nothing is written).
  """
  files, problems = find_images(paths)
  stems = output_names(files, output)
  try:
    paths_lib.makedirs(output)
  except OSError as e:
    raise errors.StorageError(
        f'--output={output} cannot be created: {e.strerror or e}') from e
  bar = progress_lib.Bar('predict', len(files), 'images', enabled=progress)
  for path, stem in zip(files, stems):
    try:
      image = read_image(path)
    except ValueError as e:
      problems.append(str(e))
      bar.update()  # Done with, though not segmented (listed at the end).
      continue
    classes = predictor(image)
    visualize.save_png(os.path.join(output, f'{stem}.png'), classes)
    visualize.save_png(os.path.join(output, f'{stem}_color.png'), classes,
                       palette=meta.palette)
    visualize.save_png(
        os.path.join(output, f'{stem}_overlay.png'),
        visualize.overlay(image, classes, meta.palette,
                          ignore_label=meta.ignore_label,
                          transparent=visualize.background_ids(
                              meta.class_names)))
    bar.update()
  bar.close()
  for message in problems:
    logging.error('%s', message)
  return problems


def _define_flags() -> None:
  """The command's flags (defined when run as a program, as every command)."""
  runtime.define_checkpoint_flags('to predict with')
  runtime.define_inference_flags()
  flags.DEFINE_string('output', None, 'Directory for the PNGs.', required=True)
  flags.adopt_module_key_flags(runtime)  # --help lists them too.


def run(checkpoint: str, output: str, paths: Sequence[str], *,
        step: Optional[int] = None, scales: Optional[Sequence[float]] = None,
        flip: Optional[bool] = None, mode: Optional[str] = None,
        config_overrides: Optional[Mapping[str, Any]] = None) -> int:
  """What the CLI does; returns the exit status (1 if any input failed).

  Args:
    checkpoint: training workdir, inference checkpoint or converted network.
    output: directory for the PNGs.
    paths: image files and directories.
    step: checkpoint step of a workdir (the latest).
    scales: test-time scales (config.eval.scales).
    flip: flip averaging (config.eval.flip).
    mode: 'whole' or 'slide' (config.eval.mode).
    config_overrides: {dotted path: value} set on the saved config first
      (--config.x=y); the arguments above take precedence.

  Returns:
    0 if every input was segmented, else 1 (the errors are logged and
    printed to stderr).
  """
  predictor = load(checkpoint, step=step, scales=scales, flip=flip,
                   mode=mode, config_overrides=config_overrides)
  meta = predictor.meta
  if meta.num_classes > 255:
    raise errors.ConfigError(
        f'{checkpoint}: {meta.num_classes} classes do not fit the 8-bit '
        'class-id PNGs predict writes (at most 255)')
  logging.info('Predicting with %s (step %s): %s', checkpoint, step,
               predictor.options)
  failed = predict_files(predictor, paths, output, meta, progress=True)
  if failed:
    print(f'{len(failed)} input(s) failed:', file=sys.stderr)
    for message in failed:
      print(f'  {message}', file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str]) -> int:
  """Segments the images named on the command line."""
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give at least one IMAGE_OR_DIR')
  flag_values = flags.FLAGS
  return run(flag_values.checkpoint, flag_values.output, paths,
             step=flag_values.step, **runtime.inference_flag_values(),
             config_overrides=runtime.config_overrides())


def cli() -> None:
  """The console script pan-jax-predict (= python -m pan_jax.predict)."""
  _define_flags()
  runtime.run(main)


if __name__ == '__main__':
  cli()
