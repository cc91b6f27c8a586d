"""Evaluation over a whole split, and the command python -m pan_jax.evaluate.

    python -m pan_jax.evaluate --checkpoint=RUN_OR_EXPORT --data_dir=DATA
        [--split=val] [--step=N] [--scales=0.5,0.75,1.0,1.25,1.5,1.75]
        [--flip] [--mode=whole|slide] [--output=OUT] [--config.x=y ...]
        [--protocols=table5 | --protocols=ss,ms,ms_flip]
        [--format=voc_test|cityscapes_test] [--show_dir=DIR]
        [--save_predictions]

--checkpoint is a training workdir, an inference checkpoint or a converted
network (checkpoints.load); its saved config is used, with --config.x=y
overrides on top (e.g. --config.eval.canvas_size="(640, 640)", or
--config.eval.padding=divisor for MMSegmentation's padding protocol).

--protocols scores the split once per protocol (PROTOCOLS: single scale,
multi-scale, multi-scale + flip, the three rows of the paper's Table 5),
each into OUT/<protocol>/report.json, and prints the rows side by side.
--format also writes the benchmark server's files (submission.py), and is
what a split without labels (a test split) is evaluated for.
--show_dir=DIR writes, for every image, DIR/<file name>_color.png (the
predicted mask in the palette) and DIR/<file name>_panel.png (image | ground
truth | prediction, captioned, with a legend of the classes present);
--save_predictions writes the raw class-id PNGs into OUT/predictions/ (to
re-score later). report.json also records images/s (after the first batch,
which compiles) and the devices.

Correct by construction:
* Every image of the split is counted exactly once: the data pipeline gives
  each process a disjoint share padded with filler examples to the same
  number of batches (`valid` = False), and fillers add nothing.
* Images are padded to the fixed canvas `config.eval.canvas_size` (one
  compiled program for the split); labels are counted only inside each
  image's valid region and where they are a class (not 255), and the model
  gets `image_sizes`, so padding changes no prediction (see inference.py).
* The `[K, K]` confusion matrix is summed on device inside the jitted step;
  the batch is one global array sharded over every device of every process,
  so the cross-device (and cross-host) sum is part of the compiled program.
  The int32 device sum is moved into an int64 host total before it could
  overflow (2^31 pixels), so large splits (Cityscapes train) count exactly.
Scores are computed on the host from the confusion matrix (metrics.py).
"""

import json
import math
import os
import sys
import time
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Tuple)

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from pan_jax import checkpoints
from pan_jax import defaults
from pan_jax import errors
from pan_jax import inference
from pan_jax import metrics
from pan_jax import models
from pan_jax import paths
from pan_jax import progress as progress_lib
from pan_jax import runtime
from pan_jax import sharding
from pan_jax import submission
from pan_jax import visualize
from pan_jax.data import pipeline
from pan_jax.data import sources
from pan_jax.data import transforms
from pan_jax.models import layers

REPORT_FILE = 'report.json'
CONFUSION_FILE = 'confusion_matrix.png'
OVERLAY_DIR = 'overlays'
# --save_predictions: OUT/predictions/<file name>.png, raw class ids.
PREDICTIONS_DIR = submission.RAW
# --show_dir: DIR/<file name><suffix> per image.
COLOR_SUFFIX = '_color.png'
PANEL_SUFFIX = '_panel.png'
_INT32_MAX = 2**31 - 1
# DeepLabv3's six test scales.
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# Evaluation protocols by name: (scales, flip). ss / ms / ms_flip are the
# rows of the paper's Table 5 (--protocols=table5).
PROTOCOLS = {'ss': ((1.0,), False), 'ms': (MULTI_SCALES, False),
             'ms_flip': (MULTI_SCALES, True)}
PROTOCOL_SETS = {'table5': ('ss', 'ms', 'ms_flip')}
PROTOCOLS_FILE = 'protocols.json'

# Jitted eval steps by (id(model), num_classes, options, mesh): the training
# loop validates many times with the same model, and re-jitting a new closure
# would recompile each time. Linen modules with partials are not hashable,
# hence the id (the entry keeps the model alive, so the id stays unique).
_EVAL_STEPS: Dict[Tuple[Any, ...], Tuple[Any, Any]] = {}


def make_eval_step(model: Any, num_classes: int,
                   options: inference.InferenceOptions,
                   mesh: jax.sharding.Mesh):
  """The jitted evaluation step (cached per model, options and mesh).

  eval_step(variables, batch, confusion, num_images)
      -> (confusion, num_images, predictions)

  Args:
    model: linen Module called as apply(variables, images, train=False,
      image_sizes=...).
    num_classes: K.
    options: InferenceOptions (static).
    mesh: the mesh; variables and sums are replicated, the batch and the
      predictions are sharded over its 'data' axis.

  Returns:
    The jitted function. `batch` holds 'image' float32 [B, Hc, Wc, 3],
    'label' int32 [B, Hc, Wc], 'image_size' int32 [B, 2], 'valid' bool [B];
    `confusion` is int32 [K, K] and `num_images` int32 [] (both donated);
    `predictions` int32 [B, Hc, Wc].
  """
  key = (id(model), num_classes, options, mesh)
  if key in _EVAL_STEPS:
    return _EVAL_STEPS[key][1]

  def eval_step(variables, batch, confusion, num_images):
    def apply_fn(images, image_sizes):
      return model.apply(variables, images, train=False,
                         image_sizes=image_sizes)

    predictions = inference.predict(apply_fn, batch['image'],
                                    batch['image_size'], options)
    labels = batch['label']
    sizes = batch['image_size']
    # The pipeline pads labels with 255 already; masking the region here too
    # makes the count independent of what the padding holds.
    inside = layers.valid_mask(sizes, labels.shape[1], labels.shape[2])
    labels = jnp.where(inside[..., 0], labels, -1)  # [B, Hc, Wc]
    valid = batch['valid'].astype(bool)
    confusion += metrics.confusion_matrix(labels, predictions, num_classes,
                                          valid=valid)
    num_images += jnp.sum(valid, dtype=jnp.int32)
    return confusion, num_images, predictions

  replicated = sharding.replicated(mesh)
  batched = sharding.batch_sharding(mesh)
  jitted = jax.jit(
      eval_step,
      in_shardings=(replicated, batched, replicated, replicated),
      out_shardings=(replicated, replicated, batched),
      donate_argnums=(2, 3))
  if len(_EVAL_STEPS) >= 8:
    _EVAL_STEPS.pop(next(iter(_EVAL_STEPS)))
  _EVAL_STEPS[key] = (model, jitted)
  return jitted


def evaluate_batches(model: Any, variables: Any,
                     batches: Iterable[Dict[str, np.ndarray]],
                     num_classes: int, mesh: jax.sharding.Mesh,
                     options: inference.InferenceOptions, *,
                     progress: bool = False, num_samples: int = 0,
                     on_batch: Optional[Callable[[Dict[str, np.ndarray],
                                                  np.ndarray], None]] = None,
                     show: Optional[Callable[[Dict[str, np.ndarray],
                                              np.ndarray], None]] = None
                     ) -> Tuple[Dict[str, Any], List[Dict[str, np.ndarray]]]:
  """Runs the model over this process's batches and scores the global sum.

  Every process must call this with the same number of batches (the eval
  pipeline guarantees it).

  Args:
    model: linen Module.
    variables: {'params', 'batch_stats'} (host or device arrays).
    batches: this process's batches ('image', 'label', 'image_size', 'valid',
      optional 'index'), the leading axis global_batch / process_count.
    num_classes: K.
    mesh: the mesh the global batch is sharded over.
    options: InferenceOptions.
    progress: show a progress bar (process 0).
    num_samples: keep this many of process 0's first valid examples for
      overlays.
    on_batch: called on every process as on_batch(local batch, predictions
      int32 [b, Hc, Wc] of its rows), e.g. a submission.Writer.
    show: called on process 0 only, as show(batch, predictions) with the
      rows of every process (gathered when there are several), so that one
      process writes each image once (e.g. a ShowWriter).

  Returns:
    (result, samples): result as in `evaluate_dataset`, plus
    'images_per_s' and 'seconds' (from the end of the first batch, which
    includes compilation; over every batch if there is only one); samples
    a list of
    {'image' float32 [h, w, 3] normalized, 'label' [h, w], 'prediction'
    [h, w], 'index' int} on process 0 (empty elsewhere).
  """
  eval_step = make_eval_step(model, num_classes, options, mesh)
  replicated = sharding.replicated(mesh)
  variables = jax.device_put(
      {name: variables[name] for name in ('params', 'batch_stats')},
      replicated)
  confusion, num_images = _zeros(num_classes, replicated)
  host_confusion = np.zeros((num_classes, num_classes), np.int64)
  host_images = 0
  pixels = 0  # Pixels added to `confusion` since it was last moved to host.
  samples = []
  keep = num_samples if jax.process_index() == 0 else 0
  bar = progress_lib.Bar(
      'evaluate', getattr(batches, 'num_examples', None), 'images',
      enabled=progress)
  start, timed_from, first_images = time.monotonic(), None, 0
  compiled = {}  # eval_step compiled, by the batch's shapes.
  for local in batches:
    batch_pixels = math.prod(local['label'].shape) * jax.process_count()
    if pixels + batch_pixels > _INT32_MAX:
      host_confusion += np.asarray(_fetch(confusion), np.int64)
      host_images += int(_fetch(num_images))
      confusion, num_images = _zeros(num_classes, replicated)
      pixels = 0
    batch = sharding.to_global(
        {k: local[k] for k in ('image', 'label', 'image_size', 'valid')},
        mesh)
    shapes = tuple(x.shape for x in jax.tree.leaves(batch))
    if shapes not in compiled:  # Every batch, with the eval pipeline.
      compiled[shapes] = runtime.compile_then_release(
          eval_step, variables, batch, confusion, num_images)
    confusion, num_images, predictions = compiled[shapes](
        variables, batch, confusion, num_images)
    pixels += batch_pixels
    if on_batch is not None:
      on_batch(local, _process_rows(predictions))
    if len(samples) < keep:
      samples.extend(_samples(local, _process_rows(predictions),
                              keep - len(samples)))
    if show is not None:
      _show(show, local, predictions)
    if timed_from is None:
      # Throughput excludes the first batch (compilation): time from its end.
      first_images = host_images + int(_fetch(num_images))
      timed_from = time.monotonic()
    bar.update(int(np.sum(local['valid'])))
  bar.close()
  host_confusion += np.asarray(_fetch(confusion), np.int64)
  host_images += int(_fetch(num_images))
  end = time.monotonic()
  result = metrics.scores(host_confusion)
  result['confusion_matrix'] = host_confusion
  result['num_images'] = host_images
  if timed_from is not None and host_images > first_images:
    result['seconds'] = end - timed_from
    result['images_per_s'] = (host_images - first_images) / max(
        end - timed_from, 1e-9)
  else:  # One batch: its time, compilation included.
    result['seconds'] = end - start
    result['images_per_s'] = host_images / max(end - start, 1e-9)
  return result, samples


def _show(show, local, predictions) -> None:
  """Calls show(batch, predictions) on process 0 with every process's rows."""
  keys = ('image', 'label', 'image_size', 'valid', 'index')
  batch = {k: np.asarray(local[k]) for k in keys if k in local}
  rows = _process_rows(predictions)
  if jax.process_count() > 1:
    # A collective: every process takes part, process 0 uses the result.
    batch, rows = multihost_utils.process_allgather((batch, rows),
                                                    tiled=True)
  if jax.process_index() == 0:
    show(batch, np.asarray(rows))


def evaluate_dataset(model: Any, variables: Any, config: Any, meta: Any,
                     mesh: jax.sharding.Mesh, split: Optional[str] = None, *,
                     options: Optional[inference.InferenceOptions] = None,
                     progress: bool = False) -> Dict[str, Any]:
  """Scores `model` on a whole split (what training calls to validate).

  Args:
    model: linen Module.
    variables: {'params', 'batch_stats'} (host arrays or replicated global
      arrays, e.g. the train state's).
    config: the whole config (data.*, eval.*).
    meta: DatasetMeta (num_classes).
    mesh: the mesh (all devices of all processes).
    split: default config.data.eval_split.
    options: inference options; default from config.eval.
    progress: show a progress bar.

  Returns:
    {'miou', 'pixel_accuracy', 'mean_accuracy': float (NaN if nothing was
    counted), 'per_class_iou', 'per_class_accuracy': float64 [K] (NaN where
    undefined, see metrics.py), 'confusion_matrix': int64 [K, K],
    'num_images': int}.
  """
  result, _ = evaluate_split(model, variables, config, meta, mesh, split,
                             options=options, progress=progress)
  return result


def evaluate_split(model: Any, variables: Any, config: Any, meta: Any,
                   mesh: jax.sharding.Mesh, split: Optional[str] = None, *,
                   options: Optional[inference.InferenceOptions] = None,
                   progress: bool = False, num_samples: int = 0,
                   on_batch: Optional[Callable[..., None]] = None,
                   show: Optional[Callable[..., None]] = None
                   ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
  """evaluate_dataset, also returning samples (evaluate_batches' arguments).

  Returns:
    (result, samples) as evaluate_batches'.
  """
  if options is None:
    options = inference.InferenceOptions.from_config(
        config.eval, min_size=models.min_input_size(config))
  batch_size = global_batch_size(config.eval.batch_size, mesh)
  batches = pipeline.build_eval_iter(
      config, split=split, batch_size=batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count())
  return evaluate_batches(model, variables, batches, meta.num_classes, mesh,
                          options, progress=progress, num_samples=num_samples,
                          on_batch=on_batch, show=show)


def global_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """config.eval.batch_size rounded up to a multiple of the device count."""
  devices = mesh.devices.size
  return max(1, math.ceil(int(batch_size) / devices)) * devices


def _zeros(num_classes: int, replicated) -> Tuple[jax.Array, jax.Array]:
  return (jax.device_put(np.zeros((num_classes, num_classes), np.int32),
                         replicated),
          jax.device_put(np.zeros((), np.int32), replicated))


def _fetch(x: jax.Array) -> np.ndarray:
  """A replicated global array's value (also when not fully addressable)."""
  return np.asarray(x.addressable_shards[0].data)


def _process_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in batch order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards], axis=0)


def _samples(local: Dict[str, np.ndarray], predictions: np.ndarray,
             limit: int) -> List[Dict[str, Any]]:
  """Up to `limit` valid examples of a local batch, cropped to their size."""
  found = []
  for b in np.flatnonzero(np.asarray(local['valid']))[:limit]:
    h, w = (int(v) for v in local['image_size'][b])
    found.append({
        'image': np.asarray(local['image'][b, :h, :w]),
        'label': np.asarray(local['label'][b, :h, :w]),
        'prediction': predictions[b, :h, :w],
        'index': int(local['index'][b]) if 'index' in local else len(found),
    })
  return found


def report(result: Dict[str, Any], meta: Any, **extra: Any
           ) -> Dict[str, Any]:
  """The JSON report: scores by class name, NaN written as null.

  Args:
    result: evaluate_dataset's result.
    meta: DatasetMeta (class_names).
    **extra: further fields (checkpoint, step, split, scales, flip, mode).

  Returns:
    A JSON-serialisable dict.
  """
  def number(value):
    value = float(value)
    return None if math.isnan(value) else value

  names = list(meta.class_names)
  by_class = {key: {n: number(v) for n, v in zip(names, result[key])}
              for key in _PER_CLASS if key in result}
  means = {key: number(result[key]) for key in _MEANS if key in result}
  timing = {key: float(result[key]) for key in ('images_per_s', 'seconds')
            if key in result}
  return {
      'miou': number(result['miou']),
      'pixel_accuracy': number(result['pixel_accuracy']),
      'mean_accuracy': number(result['mean_accuracy']),
      **means,
      **by_class,
      'num_images': int(result['num_images']),
      **timing,
      'devices': devices(),
      'class_names': names,
      # Rows ground truth, columns prediction.
      'confusion_matrix': np.asarray(result['confusion_matrix']).tolist(),
      **extra,
  }


# The per-class arrays and the means of metrics.scores that report.json
# records (by class name).
_PER_CLASS = ('per_class_iou', 'per_class_accuracy', 'per_class_dice',
              'per_class_fscore', 'per_class_precision', 'per_class_recall')
_MEANS = ('mdice', 'mfscore')


def devices() -> Dict[str, Any]:
  """What report.json says the evaluation ran on (kind, count, processes)."""
  return {'platform': jax.default_backend(),
          'kind': jax.devices()[0].device_kind,
          'count': jax.device_count(), 'process_count': jax.process_count()}


def format_table(result: Dict[str, Any], class_names: Sequence[str]) -> str:
  """The per-class table printed at the end (percentages)."""
  def percent(value):
    return '     -' if math.isnan(value) else f'{100 * value:6.2f}'

  confusion = np.asarray(result['confusion_matrix'])
  width = max([len('class')] + [len(str(n)) for n in class_names])
  dice = result.get('per_class_dice', [math.nan] * len(class_names))
  lines = [f'{"class":<{width}}     IoU     Acc    Dice  gt pixels']
  for k, name in enumerate(class_names):
    lines.append(f'{name:<{width}}  {percent(result["per_class_iou"][k])}  '
                 f'{percent(result["per_class_accuracy"][k])}  '
                 f'{percent(dice[k])}  {int(confusion[k].sum()):>9d}')
  lines.append(
      f'mIoU {percent(result["miou"]).strip()}  pixel accuracy '
      f'{percent(result["pixel_accuracy"]).strip()}  mean accuracy '
      f'{percent(result["mean_accuracy"]).strip()}  images '
      f'{int(result["num_images"])}')
  if 'mdice' in result:
    lines.append(f'mDice {percent(result["mdice"]).strip()}  mFscore '
                 f'{percent(result["mfscore"]).strip()}')
  if 'images_per_s' in result:
    lines.append(f'{result["images_per_s"]:.3g} images/s on '
                 f'{jax.device_count()} x {jax.devices()[0].device_kind}')
  return '\n'.join(lines)


def write_outputs(output: str, result: Dict[str, Any], meta: Any,
                  samples: Sequence[Dict[str, Any]],
                  extra: Dict[str, Any],
                  file_names: Optional[Sequence[str]] = None) -> None:
  """OUT/report.json, OUT/confusion_matrix.png, OUT/overlays/*.png.

  OUT may be local or gs://; each file is written atomically.

  Args:
    output: OUT.
    result: evaluate_batches' result.
    meta: DatasetMeta (class_names, palette, ignore_label).
    samples: evaluate_batches' samples (the overlays).
    extra: further report fields.
    file_names: the split's file names by index: overlays are named
      <file name>.png (default: the index, 00003.png).
  """
  text = json.dumps(report(result, meta, **extra), indent=2)
  paths.write_bytes(os.path.join(output, REPORT_FILE), (text + '\n').encode())
  visualize.save_png(
      os.path.join(output, CONFUSION_FILE),
      visualize.confusion_image(result['confusion_matrix'], meta.class_names))
  for sample in samples:
    name = (file_names[sample['index']] if file_names is not None else
            f'{sample["index"]:05d}')
    visualize.save_png(
        os.path.join(output, OVERLAY_DIR, f'{name}.png'),
        visualize.comparison(to_uint8(sample['image']), sample['label'],
                             sample['prediction'], meta.class_names,
                             meta.palette, meta.ignore_label, title=name))


def to_uint8(image: np.ndarray) -> np.ndarray:
  """A normalized float image (transforms.normalize) back to uint8 RGB."""
  return np.clip(np.round(np.asarray(image) * transforms.IMAGENET_STD +
                          transforms.IMAGENET_MEAN), 0, 255).astype(np.uint8)


class ShowWriter:
  """--show_dir: two PNGs per image of the split, named by its file name.

  DIR/<name>_color.png: the predicted ids as a palette PNG (PIL reads the ids
  back, viewers show the colours). DIR/<name>_panel.png: image | ground truth
  | prediction (visualize.comparison; image | prediction on a split without
  labels). Called as evaluate_batches' `show` (process 0, every image once).

  Attributes:
    directory: DIR.
    count: images written.
  """

  def __init__(self, directory: str, meta: Any, file_names: Sequence[str],
               labeled: bool = True):
    """Prepares the writer.

    Args:
      directory: DIR, local or gs://.
      meta: DatasetMeta (class_names, palette, ignore_label).
      file_names: the split's file names by example index.
      labeled: whether the split has ground truth to show.
    """
    self.directory = directory
    self._meta = meta
    self._file_names = list(file_names)
    self._labeled = labeled
    self.count = 0

  def __call__(self, batch: Mapping[str, np.ndarray],
               predictions: np.ndarray) -> None:
    """Writes the PNGs of every valid example of a (gathered) batch."""
    meta = self._meta
    for b in np.flatnonzero(np.asarray(batch['valid'])):
      height, width = (int(v) for v in batch['image_size'][b])
      name = self._file_names[int(batch['index'][b])]
      classes = np.asarray(predictions[b, :height, :width]).astype(np.uint8)
      label = (np.asarray(batch['label'][b, :height, :width])
               if self._labeled else None)
      visualize.save_png(os.path.join(self.directory, name + COLOR_SUFFIX),
                         classes, palette=meta.palette)
      visualize.save_png(
          os.path.join(self.directory, name + PANEL_SUFFIX),
          visualize.comparison(
              to_uint8(batch['image'][b, :height, :width]), label, classes,
              meta.class_names, meta.palette, meta.ignore_label, title=name))
      self.count += 1


def _define_flags() -> None:
  """The command's flags (defined when run as a program, as every command)."""
  runtime.define_checkpoint_flags('to evaluate')
  runtime.define_inference_flags()
  flags.DEFINE_string('data_dir', None,
                      'Prepared datasets (default: the config\'s).')
  flags.DEFINE_string('split', None,
                      'Split to evaluate (default config.data.eval_split).')
  flags.DEFINE_integer('batch_size', None,
                       'Images per batch over all devices (default '
                       'config.eval.batch_size).')
  flags.DEFINE_integer('num_overlays', None,
                       'Overlay PNGs to write (default '
                       'config.eval.num_overlays).')
  flags.DEFINE_string('output', None,
                      'Report directory (default CHECKPOINT/eval_<split>).')
  flags.DEFINE_list(
      'protocols', None,
      'Score the split once per protocol, each in OUTPUT/<protocol>/: '
      f'{", ".join(PROTOCOLS)}, or table5 (= ss,ms,ms_flip, the paper\'s '
      'Table 5). Instead of --scales/--flip.')
  flags.DEFINE_enum(
      'format', None, list(submission.FORMATS),
      'Also write the benchmark server\'s files into OUTPUT/<format>/ '
      '(needed for a split without labels).')
  flags.DEFINE_string(
      'show_dir', None, 'Write every image\'s predicted colour mask and an '
      'image | ground truth | prediction panel here (local or gs://).')
  flags.DEFINE_bool(
      'save_predictions', False, 'Write the raw class-id PNGs into '
      f'OUTPUT/{PREDICTIONS_DIR}/ (to re-score later).')
  flags.adopt_module_key_flags(runtime)  # --help lists them too.


def protocol_runs(protocols: Sequence[str]
                  ) -> List[Tuple[str, Tuple[float, ...], bool]]:
  """(name, scales, flip) of each protocol named (sets expanded, once each).

  Args:
    protocols: names from PROTOCOLS or PROTOCOL_SETS.

  Returns:
    The protocols in the order given.

  Raises:
    errors.UsageError: an unknown name.
  """
  names = []
  for name in protocols:
    if name not in PROTOCOLS and name not in PROTOCOL_SETS:
      raise errors.UsageError(
          f'--protocols: unknown protocol {name!r}; valid: '
          f'{", ".join(list(PROTOCOLS) + list(PROTOCOL_SETS))}')
    names.extend(PROTOCOL_SETS.get(name, (name,)))
  return [(name, *PROTOCOLS[name]) for name in dict.fromkeys(names)]


def format_protocols(reports: Mapping[str, Mapping[str, Any]]) -> str:
  """One line per protocol: scales, flip, mIoU and accuracies (percent)."""
  def percent(value):
    return '     -' if value is None else f'{100 * value:6.2f}'

  lines = ['protocol  flip    mIoU  pix acc  mean acc  scales']
  for name, rep in reports.items():
    lines.append(
        f'{name:<8}  {"yes" if rep["flip"] else "no":<4}  '
        f'{percent(rep["miou"])}  {percent(rep["pixel_accuracy"]):>7}  '
        f'{percent(rep["mean_accuracy"]):>8}  '
        f'{",".join(str(x) for x in rep["scales"])}')
  return '\n'.join(lines)


def run(checkpoint: str, *, data_dir: Optional[str] = None,
        split: Optional[str] = None, step: Optional[int] = None,
        scales: Optional[Sequence[float]] = None, flip: Optional[bool] = None,
        mode: Optional[str] = None, batch_size: Optional[int] = None,
        num_overlays: Optional[int] = None, output: Optional[str] = None,
        config_overrides: Optional[Mapping[str, Any]] = None,
        progress: bool = True, protocols: Optional[Sequence[str]] = None,
        output_format: Optional[str] = None,
        show_dir: Optional[str] = None,
        save_predictions: bool = False) -> Dict[str, Any]:
  """What the CLI does; None arguments take the checkpoint config's values.

  Args:
    checkpoint: training workdir, inference checkpoint or converted network.
    data_dir: prepared datasets (config.data.data_dir).
    split: split to evaluate (config.data.eval_split).
    step: checkpoint step of a workdir (the latest).
    scales: test-time scales (config.eval.scales).
    flip: flip averaging (config.eval.flip).
    mode: 'whole' or 'slide' (config.eval.mode).
    batch_size: images per batch over all devices (config.eval.batch_size).
    num_overlays: overlay PNGs to write (config.eval.num_overlays).
    output: report directory (CHECKPOINT/eval_<split>).
    config_overrides: {dotted path: value} set on the saved config first
      (--config.x=y); the arguments above take precedence.
    progress: show a progress bar.
    protocols: instead of scales/flip, score once per protocol (names of
      PROTOCOLS / PROTOCOL_SETS), each into OUTPUT/<protocol>/.
    output_format: also write the benchmark server's files (one of
      submission.FORMATS) into OUTPUT/<format>/.
    show_dir: write every image's colour mask and comparison panel here
      (ShowWriter; with protocols, into SHOW_DIR/<protocol>/).
    save_predictions: write the raw class-id PNGs into
      OUTPUT/predictions/.

  Returns:
    The report (also written to OUTPUT/report.json by process 0); with
    `protocols`, {'protocols': {name: report}} (OUTPUT/protocols.json).

  Raises:
    errors.UsageError: protocols with scales, flip or a format; a format
      for other classes; a split without labels and no format.
  """
  if protocols and (scales is not None or flip is not None or
                    output_format):
    raise errors.UsageError(
        '--protocols sets the scales and flip of each protocol; give it '
        'without --scales, --flip and --format')
  config, meta, variables, step = checkpoints.load(checkpoint, step)
  defaults.override(config, config_overrides or {})
  if data_dir:
    config.data.data_dir = data_dir
  if batch_size:
    config.eval.batch_size = batch_size
  split = split or config.data.eval_split
  # Scores (and server files) count class ids: they must mean the same
  # classes in the checkpoint and the dataset.
  sources.check_classes(
      meta, sources.get_meta(config.data), f'checkpoint {checkpoint}',
      f'dataset {config.data.name} in {config.data.data_dir}')
  if output_format:
    submission.check_format(output_format, meta)
  if (show_dir or save_predictions) and meta.num_classes > 255:
    raise errors.UsageError(
        f'{checkpoint}: {meta.num_classes} classes do not fit the 8-bit '
        'PNGs of --show_dir / --save_predictions (at most 255)')
  labeled = sources.has_labels(config.data, split)
  if not labeled and not output_format:
    raise errors.UsageError(
        f'split {split!r} of {config.data.name} has no labels (a benchmark '
        'test split), so there is nothing to score; write the server\'s '
        f'files with --format={"|".join(submission.FORMATS)}')
  if num_overlays is None:
    num_overlays = config.eval.num_overlays
  output = output or os.path.join(checkpoint, f'eval_{split}')
  model = models.create_model(config, meta.num_classes)
  mesh = sharding.make_mesh()
  runs = (protocol_runs(protocols) if protocols else
          [(None, scales, flip)])
  reports = {}
  file_names = (sources.file_names(config.data, split)
                if show_dir or save_predictions or num_overlays or
                output_format else None)
  for name, run_scales, run_flip in runs:
    options = inference.InferenceOptions.from_config(
        config.eval, mode=mode, scales=run_scales, flip=run_flip,
        min_size=models.min_input_size(config))
    config.eval.mode = options.mode  # The pipeline's canvas check reads it.
    where = output if name is None else os.path.join(output, name)
    writer = (submission.Writer(output_format, output, file_names)
              if output_format else None)
    raw = (submission.Writer(submission.RAW, where, file_names)
           if save_predictions else None)
    shower = (ShowWriter(show_dir if name is None else
                         os.path.join(show_dir, name), meta, file_names,
                         labeled) if show_dir else None)
    logging.info('Evaluating %s (step %s) on %s/%s: %s, %d device(s)',
                 checkpoint, step, config.data.name, split, options,
                 mesh.devices.size)
    result, samples = evaluate_split(model, variables, config, meta, mesh,
                                     split, options=options,
                                     progress=progress,
                                     num_samples=num_overlays,
                                     on_batch=_each(writer, raw),
                                     show=shower)
    extra = {'checkpoint': paths.absolute(checkpoint), 'step': step,
             'dataset': config.data.name, 'split': split,
             'mode': options.mode, 'scales': list(options.scales),
             'flip': options.flip, 'padding': options.padding,
             'size_divisor': options.size_divisor, 'labeled': labeled}
    if name is not None:
      extra['protocol'] = name
    if writer is not None:
      extra['submission'] = writer.summary()
    if raw is not None:
      extra['predictions'] = raw.summary()['directory']
    if shower is not None:
      extra['show_dir'] = paths.absolute(shower.directory)
    if jax.process_index() == 0:
      write_outputs(where, result, meta, samples, extra, file_names)
      if labeled:
        print(format_table(result, meta.class_names), file=sys.stdout)
      print(f'report: {os.path.join(where, REPORT_FILE)}', file=sys.stdout)
      if writer is not None:
        print(f'{output_format} files: {writer.directory} (archive: '
              f'{extra["submission"]["archive_command"]})', file=sys.stdout)
    reports[name] = report(result, meta, **extra)
  if not protocols:
    return reports[None]
  if jax.process_index() == 0:
    checkpoints.files.write_json(os.path.join(output, PROTOCOLS_FILE), {
        'checkpoint': paths.absolute(checkpoint), 'step': step,
        'split': split, 'protocols': [
            {key: rep[key] for key in (
                'protocol', 'scales', 'flip', 'padding', 'miou',
                'pixel_accuracy', 'mean_accuracy', 'num_images')}
            for rep in reports.values()]})
    print(format_protocols(reports), file=sys.stdout)
  return {'protocols': reports}


def _each(*callbacks):
  """One on_batch callback calling every one given (None: none given)."""
  callbacks = [c for c in callbacks if c is not None]
  if not callbacks:
    return None

  def call(local, predictions):
    for callback in callbacks:
      callback(local, predictions)
  return call


def main(argv: Sequence[str]) -> None:
  """Evaluates --checkpoint on --split and writes the report."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  flag_values = flags.FLAGS
  run(flag_values.checkpoint, data_dir=flag_values.data_dir,
      split=flag_values.split, step=flag_values.step,
      **runtime.inference_flag_values(), batch_size=flag_values.batch_size,
      num_overlays=flag_values.num_overlays, output=flag_values.output,
      config_overrides=runtime.config_overrides(),
      protocols=flag_values.protocols, output_format=flag_values.format,
      show_dir=flag_values.show_dir,
      save_predictions=flag_values.save_predictions)


def cli() -> None:
  """The console script pan-jax-evaluate (= python -m pan_jax.evaluate)."""
  _define_flags()
  runtime.run(main)


if __name__ == '__main__':
  cli()
