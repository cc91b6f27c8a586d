"""Benchmark-server files on the real VOC and Cityscapes samples.

Each sample is prepared with a labelled split and an unlabelled test split;
a tiny network with VOC's / Cityscapes' classes is evaluated with
--format=voc_test / cityscapes_test. The files are checked for names, sizes,
palette and id mapping, and, on the labelled split, read back and scored
against the ground truth: that confusion matrix must equal evaluate's own.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import smoke
from pan_jax import errors
from pan_jax import evaluate
from pan_jax import models
from pan_jax import submission
from pan_jax.checkpoints import exported
from pan_jax.data import cityscapes
from pan_jax.data import prepare
from pan_jax.data import sources
from pan_jax.data import voc


def _export(path, data_dir, name, canvas, seed=0):
  """A random tiny network for dataset `name`, as an inference checkpoint."""
  config = smoke.get_config()
  config.data.name = name
  config.data.data_dir = str(data_dir)
  config.eval.canvas_size = canvas
  config.eval.num_overlays = 1
  meta = sources.get_meta(config.data)
  model = models.create_model(config, meta.num_classes)
  # Random weights already predict several classes over a photo.
  variables = jax.jit(model.init)(jax.random.key(seed),
                                  jnp.zeros((1, 64, 64, 3)))
  exported.save(str(path), config, meta, jax.device_get(variables), step=1)
  return str(path)


def _confusion(truth, prediction, num_classes):
  keep = truth != 255
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (truth[keep].astype(np.int64),
                        prediction[keep].astype(np.int64)), 1)
  return confusion


@pytest.fixture(scope='module')
def voc_setup(tmp_path_factory):
  """The 3-image VOC sample: val (1 image, labelled) and test (3, not)."""
  shared = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), '..', 'shared', 'data', 'voc_sample')
  if not os.path.isdir(shared):
    pytest.skip(f'{shared} not present')
  root = tmp_path_factory.mktemp('voc')
  voc_root = root / 'src' / 'VOCdevkit' / 'VOC2012'
  (voc_root / 'ImageSets' / 'Segmentation').mkdir(parents=True)
  for sub in ('JPEGImages', 'SegmentationClass'):
    os.symlink(os.path.join(shared, sub), voc_root / sub)
  ids = sorted(os.path.splitext(f)[0] for f in os.listdir(
      os.path.join(shared, 'SegmentationClass')))
  for split, split_ids in (('train', ids[:2]), ('val', ids[2:]),
                           ('trainval', ids), ('test', ids)):
    (voc_root / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text(
        ''.join(i + '\n' for i in split_ids))
  prepare.prepare('voc2012_aug', str(root / 'src'), str(root / 'data'))
  checkpoint = _export(root / 'export', root / 'data', 'voc2012_aug',
                       (512, 512))
  return root, shared, ids, checkpoint


def test_voc_test_split_is_built_without_labels(voc_setup):
  root, _, ids, _ = voc_setup
  config = smoke.get_config().data
  config.name, config.data_dir = 'voc2012_aug', str(root / 'data')
  assert not sources.has_labels(config, 'test')
  assert sources.has_labels(config, 'val')
  assert sorted(sources.file_names(config, 'test')) == ids
  source = sources.open_split(config, 'test')
  assert all((source[i]['label'] == 255).all() for i in range(len(source)))


def test_voc_files_score_like_evaluate_on_a_labelled_split(voc_setup,
                                                           tmp_path):
  root, shared, ids, checkpoint = voc_setup
  out = tmp_path / 'val'
  report = evaluate.run(checkpoint, data_dir=str(root / 'data'), split='val',
                        output=str(out), output_format='voc_test',
                        progress=False,
                        config_overrides={'eval.padding': 'divisor'})
  assert report['padding'] == 'divisor' and report['size_divisor'] == 32
  assert report['labeled'] and report['num_images'] == 1
  folder = out / 'voc_test' / submission.VOC_RESULTS_DIR
  assert sorted(os.listdir(folder)) == [ids[2] + '.png']
  image = Image.open(folder / f'{ids[2]}.png')
  photo = Image.open(os.path.join(shared, 'JPEGImages', ids[2] + '.jpg'))
  assert image.mode == 'P' and image.size == photo.size
  palette = np.asarray(image.getpalette(), np.int64).reshape(-1, 3)
  np.testing.assert_array_equal(palette[:256], voc.color_map(256))
  prediction = np.asarray(image)
  truth = np.asarray(Image.open(os.path.join(shared, 'SegmentationClass',
                                             ids[2] + '.png')))
  assert len(np.unique(prediction)) > 1  # Not a trivial map.
  np.testing.assert_array_equal(_confusion(truth, prediction, 21),
                                np.asarray(report['confusion_matrix']))
  written = json.loads((out / 'report.json').read_text())
  assert written['submission']['format'] == 'voc_test'
  assert 'tar czf' in written['submission']['archive_command']


def test_voc_test_split_gives_one_palette_png_per_image(voc_setup, tmp_path):
  root, shared, ids, checkpoint = voc_setup
  with pytest.raises(errors.UsageError, match='has no labels'):
    evaluate.run(checkpoint, data_dir=str(root / 'data'), split='test',
                 output=str(tmp_path / 'refused'), progress=False)
  out = tmp_path / 'test'
  report = evaluate.run(checkpoint, data_dir=str(root / 'data'),
                        split='test', output=str(out),
                        output_format='voc_test', progress=False)
  assert report['labeled'] is False and report['miou'] is None
  assert report['num_images'] == 3
  folder = out / 'voc_test' / submission.VOC_RESULTS_DIR
  assert sorted(os.listdir(folder)) == [i + '.png' for i in ids]
  for image_id in ids:
    image = Image.open(folder / f'{image_id}.png')
    photo = Image.open(os.path.join(shared, 'JPEGImages', image_id + '.jpg'))
    assert image.mode == 'P' and image.size == photo.size
    assert np.asarray(image).max() < 21


@pytest.fixture(scope='module')
def cityscapes_setup(tmp_path_factory):
  """The Cityscapes frame as val (labelled) and, once more, as test."""
  shared = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), '..', 'shared', 'data',
                        'cityscapes_sample')
  if not os.path.isdir(shared):
    pytest.skip(f'{shared} not present')
  root = tmp_path_factory.mktemp('cityscapes')
  src = root / 'src'
  for sub in ('leftImg8bit', 'gtFine'):
    (src / sub).mkdir(parents=True)
    os.symlink(os.path.join(shared, sub, 'val'), src / sub / 'val')
  # The test split: images only (its gtFine is never read).
  os.symlink(os.path.join(shared, 'leftImg8bit', 'val'),
             src / 'leftImg8bit' / 'test')
  prepare.prepare('cityscapes', str(src), str(root / 'data'))
  checkpoint = _export(root / 'export', root / 'data', 'cityscapes',
                       (128, 256), seed=3)
  return root, shared, checkpoint


STEM = 'frankfurt_000000_000294'


def test_cityscapes_label_ids_map_back_to_the_scored_train_ids(
    cityscapes_setup, tmp_path):
  root, _, checkpoint = cityscapes_setup
  out = tmp_path / 'val'
  report = evaluate.run(checkpoint, data_dir=str(root / 'data'), split='val',
                        output=str(out), output_format='cityscapes_test',
                        progress=False)
  assert os.listdir(out / 'cityscapes_test') == [STEM + '_labelIds.png']
  image = Image.open(out / 'cityscapes_test' / f'{STEM}_labelIds.png')
  assert image.mode == 'L' and image.size == (256, 128)
  label_ids = np.asarray(image)
  assert set(np.unique(label_ids)) <= set(cityscapes.TRAIN_ID_TO_LABEL_ID)
  train_ids = np.vectorize(cityscapes.LABEL_TO_TRAIN_ID.get)(label_ids)
  assert len(np.unique(train_ids)) > 1  # Several ids to map.
  config = smoke.get_config().data
  config.name, config.data_dir = 'cityscapes', str(root / 'data')
  truth = sources.open_split(config, 'val')[0]['label']
  np.testing.assert_array_equal(_confusion(truth, train_ids, 19),
                                np.asarray(report['confusion_matrix']))


def test_cityscapes_test_split_and_the_class_check(cityscapes_setup,
                                                   voc_setup, tmp_path):
  root, _, checkpoint = cityscapes_setup
  out = tmp_path / 'test'
  report = evaluate.run(checkpoint, data_dir=str(root / 'data'),
                        split='test', output=str(out),
                        output_format='cityscapes_test', progress=False)
  assert report['labeled'] is False and report['num_images'] == 1
  assert os.listdir(out / 'cityscapes_test') == [STEM + '_labelIds.png']
  # A VOC network cannot write Cityscapes files (nor the reverse).
  with pytest.raises(errors.UsageError, match='19 classes'):
    evaluate.run(voc_setup[3], data_dir=str(voc_setup[0] / 'data'),
                 split='test', output=str(tmp_path / 'x'),
                 output_format='cityscapes_test', progress=False)


def test_train_id_to_label_id_is_the_inverse_mapping():
  train_ids = np.arange(19).reshape(1, 19)
  label_ids = cityscapes.to_label_ids(train_ids)
  assert [cityscapes.LABEL_TO_TRAIN_ID[int(i)] for i in label_ids[0]] == list(
      range(19))
  assert label_ids[0, 0] == 7 and label_ids[0, 13] == 26  # road, car
  with pytest.raises(ValueError, match='train ids'):
    cityscapes.to_label_ids(np.array([[19]]))
