"""Tests of pan_jax.evaluate: exact counting over devices, scores, report."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
import eval_standins
from pan_jax import errors
from pan_jax import evaluate
from pan_jax import inference
from pan_jax import metrics
from pan_jax import sharding

NUM_CLASSES = 4
CANVAS = (24, 20)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples(num, seed=0):
  """`num` images of different sizes with labels (255 patches included)."""
  rng = np.random.default_rng(seed)
  examples = []
  # A few distinct sizes (the reference compiles once per size).
  sizes = [CANVAS, (17, 20), (9, 13)]
  for index in range(num):
    h, w = sizes[index % len(sizes)]
    label = rng.integers(0, NUM_CLASSES, size=(h, w)).astype(np.int32)
    label[rng.random((h, w)) < 0.1] = 255
    examples.append({'image': rng.normal(size=(h, w, 3)).astype(np.float32),
                     'label': label, 'index': index})
  return examples


def _batches(examples, batch_size, process_index=0, process_count=1):
  """What pipeline.build_eval_iter yields: padded canvases, fillers."""
  mine = examples[process_index::process_count]
  num_batches = math.ceil(math.ceil(len(examples) / process_count)
                          / batch_size)
  mine = mine + [None] * (num_batches * batch_size - len(mine))
  for start in range(0, len(mine), batch_size):
    batch = {'image': [], 'label': [], 'image_size': [], 'valid': [],
             'index': []}
    for example in mine[start:start + batch_size]:
      image = np.zeros(CANVAS + (3,), np.float32)
      label = np.full(CANVAS, 255, np.int32)
      size, index = CANVAS, -1
      if example is not None:
        size = example['label'].shape
        image[:size[0], :size[1]] = example['image']
        label[:size[0], :size[1]] = example['label']
        index = example['index']
      batch['image'].append(image)
      batch['label'].append(label)
      batch['image_size'].append(np.array(size, np.int32))
      batch['valid'].append(example is not None)
      batch['index'].append(index)
    yield {k: np.stack(v) for k, v in batch.items()}


def _model():
  module = eval_standins.ConvPool(num_classes=NUM_CLASSES)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  return module, {'params': variables['params'], 'batch_stats': {}}


def test_13_images_on_8_devices_counted_once_and_scored_exactly():
  assert jax.device_count() == 8
  module, variables = _model()
  examples = _examples(13)
  mesh = sharding.make_mesh()
  options = inference.InferenceOptions()
  result, samples = evaluate.evaluate_batches(
      module, variables, _batches(examples, 8), NUM_CLASSES, mesh, options,
      num_samples=3)
  assert result['num_images'] == 13
  # Independent reference: each image alone, at its own size, one device.
  expected = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  apply = jax.jit(module.apply)
  for example in examples:
    logits = apply(variables, example['image'][None])
    prediction = np.asarray(jnp.argmax(logits, -1))[0]
    keep = example['label'] != 255
    np.add.at(expected, (example['label'][keep], prediction[keep]), 1)
  np.testing.assert_array_equal(result['confusion_matrix'], expected)
  assert result['miou'] == metrics.scores(expected)['miou']
  assert [s['index'] for s in samples] == [0, 1, 2]
  assert samples[1]['prediction'].shape == examples[1]['label'].shape


def test_device_and_batch_count_do_not_change_the_result():
  module, variables = _model()
  examples = _examples(13, seed=1)
  options = inference.InferenceOptions()
  eight, _ = evaluate.evaluate_batches(
      module, variables, _batches(examples, 16), NUM_CLASSES,
      sharding.make_mesh(), options)
  one, _ = evaluate.evaluate_batches(
      module, variables, _batches(examples, 3), NUM_CLASSES,
      sharding.make_mesh(jax.devices()[:1]), options)
  np.testing.assert_array_equal(eight['confusion_matrix'],
                                one['confusion_matrix'])
  assert eight['num_images'] == one['num_images'] == 13


def test_report_and_table(tmp_path):
  confusion = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
  result = metrics.scores(confusion)
  result.update(confusion_matrix=confusion, num_images=2)

  class Meta:
    class_names = ('bg', 'cat', 'dog')
    palette = ((0, 0, 0), (128, 0, 0), (0, 128, 0))
    ignore_label = 255

  rng = np.random.default_rng(0)
  samples = [{'image': rng.normal(size=(6, 7, 3)), 'index': 3,
              'label': rng.integers(0, 3, size=(6, 7)),
              'prediction': rng.integers(0, 3, size=(6, 7))}]
  evaluate.write_outputs(str(tmp_path), result, Meta, samples,
                         {'step': 7, 'scales': [1.0], 'flip': False})
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report['per_class_iou']['dog'] is None  # absent: NaN -> null
  assert report['per_class_iou']['cat'] == 3 / 6
  assert report['miou'] == (5 / 8 + 3 / 6) / 2
  assert report['num_images'] == 2 and report['step'] == 7
  assert report['confusion_matrix'] == confusion.tolist()
  assert (tmp_path / 'confusion_matrix.png').exists()
  assert (tmp_path / 'overlays' / '00003.png').exists()
  table = evaluate.format_table(result, Meta.class_names)
  assert 'dog' in table and 'mIoU 56.25' in table


def test_evaluate_run_on_the_fake_split_with_the_real_model(tmp_path):
  """evaluate.run on a smoke workdir: counts, scores and files."""
  # pylint: disable=g-import-not-at-top
  from pan_jax.data import sources
  from pan_jax.data import transforms
  # pylint: enable=g-import-not-at-top
  workdir, config, meta, model, variables = eval_standins.smoke_workdir()
  output = tmp_path / 'out'
  report = evaluate.run(workdir, output=str(output), num_overlays=2,
                        batch_size=4, progress=False)
  # Independent reference: the split's examples padded by hand, one device.
  source = sources.open_split(config.data, config.data.eval_split)
  canvas = tuple(config.eval.canvas_size)
  images = np.zeros((len(source),) + canvas + (3,), np.float32)
  sizes = np.zeros((len(source), 2), np.int32)
  labels = []
  for i in range(len(source)):
    example = source[i]
    h, w = example['label'].shape
    images[i, :h, :w] = transforms.normalize(example['image'])
    sizes[i] = h, w
    labels.append(example['label'].astype(np.int64))
  logits = jax.jit(lambda v, x, s: model.apply(v, x, train=False,
                                               image_sizes=s))(
                                                   variables, images, sizes)
  predictions = np.asarray(jnp.argmax(logits, -1))
  expected = np.zeros((meta.num_classes,) * 2, np.int64)
  for i, label in enumerate(labels):
    h, w = label.shape
    keep = label != 255
    np.add.at(expected, (label[keep], predictions[i, :h, :w][keep]), 1)
  confusion = np.asarray(report['confusion_matrix'])
  assert report['num_images'] == len(source) == 10
  # Ground-truth pixels per class do not depend on the predictions: exact.
  np.testing.assert_array_equal(confusion.sum(1), expected.sum(1))
  # Predictions: another program (8 devices, batch 4); allow rare ties.
  assert np.abs(confusion - expected).sum() <= 2e-3 * expected.sum()
  assert report['step'] == 4 and report['scales'] == [1.0]
  assert report['flip'] is False and report['mode'] == 'whole'
  # The padding protocol is recorded (the model was told each valid size).
  assert report['padding'] == 'exact' and report['labeled'] is True
  assert set(report['per_class_iou']) == set(meta.class_names)
  written = json.loads((output / 'report.json').read_text())
  assert written['miou'] == report['miou']
  assert (output / 'confusion_matrix.png').exists()
  assert len(list((output / 'overlays').iterdir())) == 2


@pytest.mark.slow
def test_table5_protocols_in_one_call(tmp_path):
  """--protocols=table5: single scale, multi-scale, multi-scale + flip."""
  workdir = eval_standins.smoke_workdir()[0]
  output = tmp_path / 'table5'
  result = evaluate.run(workdir, output=str(output), protocols=['table5'],
                        num_overlays=0, batch_size=8, progress=False)
  reports = result['protocols']
  assert list(reports) == ['ss', 'ms', 'ms_flip']
  assert (reports['ss']['scales'], reports['ss']['flip']) == ([1.0], False)
  assert reports['ms']['scales'] == list(evaluate.MULTI_SCALES)
  assert not reports['ms']['flip'] and reports['ms_flip']['flip']
  rows = json.loads((output / evaluate.PROTOCOLS_FILE).read_text())
  assert [r['protocol'] for r in rows['protocols']] == ['ss', 'ms', 'ms_flip']
  for name, report in reports.items():
    written = json.loads((output / name / 'report.json').read_text())
    assert written['protocol'] == name
    assert written['miou'] == report['miou']
    assert written['num_images'] == 10
  # The single-scale row is the plain evaluation's number.
  plain = evaluate.run(workdir, output=str(tmp_path / 'plain'),
                       num_overlays=0, batch_size=8, progress=False)
  assert reports['ss']['confusion_matrix'] == plain['confusion_matrix']
  table = evaluate.format_protocols(reports)
  assert table.splitlines()[3].startswith('ms_flip')


def test_protocols_exclude_scales_flip_and_format():
  for extra in ({'scales': [1.0]}, {'flip': True},
                {'output_format': 'voc_test'}):
    try:
      evaluate.run('/nonexistent', protocols=['ss'], **extra)
    except errors.UsageError as e:
      assert '--protocols' in str(e)
    else:
      raise AssertionError(f'{extra} accepted')
  try:
    evaluate.protocol_runs(['ss', 'tabel5'])
  except errors.UsageError as e:
    assert 'tabel5' in str(e) and 'table5' in str(e)
  assert [n for n, _, _ in evaluate.protocol_runs(['ms', 'table5'])] == [
      'ms', 'ss', 'ms_flip']


def test_command_takes_config_overrides(tmp_path):
  """--config.x=y on top of the checkpoint's saved config, checked fields."""
  workdir = eval_standins.smoke_workdir()[0]

  def evaluate_command(*flags):
    return subprocess.run(
        [sys.executable, '-m', 'pan_jax.evaluate', f'--checkpoint={workdir}',
         f'--output={tmp_path / "out"}', *flags], cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
        text=True, timeout=600, check=False)

  result = evaluate_command('--config.eval.canvas_size=(640, 640)',
                            '--config.eval.num_overlays=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(list((tmp_path / 'out' / 'overlays').iterdir())) == 1
  # The override is what the canvas check sees (the split has 96x96 images).
  result = evaluate_command('--config.eval.canvas_size=(64, 64)')
  assert result.returncode != 0
  assert 'config.eval.canvas_size=(64, 64) cannot hold' in result.stderr
  result = evaluate_command('--config.eval.canvass_size=(640, 640)')
  assert result.returncode != 0
  assert 'Did you mean "canvas_size" instead of "canvass_size"?' in (
      result.stderr)


def test_bench_eval_measures_the_eval_step():
  # pylint: disable=g-import-not-at-top
  from pan_jax.bench import eval as eval_bench
  # pylint: enable=g-import-not-at-top
  row = eval_bench.measure(
      smoke.get_config(), 'single', config_name='configs/smoke.py',
      canvas=32, image_size=(30, 20), batch=0, iters=1, warmup=0, classes=3,
      dtype='float32', scales=eval_bench.MULTI_SCALES)
  assert row['images_per_s'] > 0 and row['batch'] == 8  # 8 fake devices
  assert row['scales'] == [1.0] and row['image_size'] == [30, 20]


def test_report_adds_dice_fscore_speed_and_devices(tmp_path):
  """A tiny case by hand: 2 classes + one absent, predicted nowhere."""
  # Class 0: 6 gt pixels, 5 right; class 1: 4 gt, 3 right; class 2: 1 gt
  # pixel, never predicted.
  confusion = np.array([[5, 1, 0], [1, 3, 0], [1, 0, 0]])
  result = metrics.scores(confusion)
  result.update(confusion_matrix=confusion, num_images=2, images_per_s=4.0,
                seconds=0.5)

  class Meta:
    class_names = ('bg', 'cat', 'dog')

  rep = evaluate.report(result, Meta)
  dice = {'bg': 2 * 5 / (6 + 7), 'cat': 2 * 3 / (4 + 4), 'dog': 0.0}
  assert rep['per_class_dice'] == dice
  assert math.isclose(rep['mdice'], sum(dice.values()) / 3)
  # precision bg 5/7, cat 3/4, dog undefined (never predicted): its Fscore
  # is null and left out of the mean, unlike its Dice of 0.
  f_bg = 2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6)
  f_cat = 2 * (3 / 4) * (3 / 4) / (3 / 4 + 3 / 4)
  assert math.isclose(rep['per_class_fscore']['bg'], f_bg)
  assert math.isclose(rep['per_class_fscore']['cat'], f_cat)
  assert rep['per_class_fscore']['dog'] is None
  assert math.isclose(rep['mfscore'], (f_bg + f_cat) / 2)
  assert rep['per_class_precision']['dog'] is None
  assert rep['per_class_recall']['dog'] == 0.0
  assert rep['images_per_s'] == 4.0
  assert rep['devices'] == {'platform': 'cpu', 'kind': 'cpu', 'count': 8,
                            'process_count': 1}
  table = evaluate.format_table(result, Meta.class_names)
  assert f'mDice {100 * rep["mdice"]:.2f}' in table


def test_show_dir_and_save_predictions(tmp_path):
  """--show_dir writes two PNGs per image named by file name, each once;
  --save_predictions the raw ids, equal to the scored predictions."""
  # pylint: disable=g-import-not-at-top
  from PIL import Image
  from pan_jax.data import sources
  # pylint: enable=g-import-not-at-top
  workdir, config, meta, _, _ = eval_standins.smoke_workdir()
  output, show = tmp_path / 'out', tmp_path / 'show'
  rep = evaluate.run(workdir, output=str(output), num_overlays=1,
                     batch_size=4, progress=False, show_dir=str(show),
                     save_predictions=True)
  names = sources.file_names(config.data, config.data.eval_split)
  source = sources.open_split(config.data, config.data.eval_split)
  assert len(names) == rep['num_images'] == 10
  expected = {n + s for n in names
              for s in (evaluate.COLOR_SUFFIX, evaluate.PANEL_SUFFIX)}
  assert {p.name for p in show.iterdir()} == expected
  confusion = np.zeros((meta.num_classes,) * 2, np.int64)
  for index, name in enumerate(names):
    label = source[index]['label']
    h, w = label.shape
    raw = np.asarray(Image.open(output / 'predictions' / f'{name}.png'))
    assert raw.shape == (h, w) and raw.dtype == np.uint8
    color = Image.open(show / f'{name}{evaluate.COLOR_SUFFIX}')
    assert color.mode == 'P' and color.size == (w, h)
    np.testing.assert_array_equal(np.asarray(color), raw)
    panel = np.asarray(Image.open(show / f'{name}{evaluate.PANEL_SUFFIX}'))
    # Three panes of the image's size, 4-pixel gaps, caption strip above,
    # legend below.
    assert panel.shape[1] == 3 * w + 2 * 4 and panel.shape[0] > h + 16
    keep = label != 255
    np.add.at(confusion, (label[keep], raw[keep]), 1)
  # The raw files are what was scored.
  np.testing.assert_array_equal(confusion, rep['confusion_matrix'])
  assert rep['predictions'].endswith('predictions')
  assert len(list((output / 'overlays').iterdir())) == 1
  assert (output / 'overlays' / f'{names[0]}.png').exists()


def test_show_dir_on_gcs(tmp_path, gcs_bucket):
  # pylint: disable=g-import-not-at-top
  from pan_jax import paths
  # pylint: enable=g-import-not-at-top
  workdir = eval_standins.smoke_workdir()[0]
  show = f'{gcs_bucket}/show'
  rep = evaluate.run(workdir, output=f'{gcs_bucket}/out', num_overlays=0,
                     batch_size=8, progress=False, show_dir=show)
  written = sorted(paths.listdir(show))
  assert len(written) == 2 * rep['num_images'] == 20
  assert paths.exists(f'{gcs_bucket}/out/report.json')
