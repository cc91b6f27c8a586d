"""Tests of pan_jax.predict: PNG outputs at the input size, bad files."""

import os

import numpy as np
from PIL import Image
import pytest

import eval_standins
from pan_jax import predict
from pan_jax.checkpoints import exported


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """An inference checkpoint of the smoke model (no StableHLO: not needed)."""
  workdir, config, meta, _, variables = eval_standins.smoke_workdir()
  path = str(tmp_path_factory.mktemp('predict') / 'export')
  exported.save(path, config, meta, variables, step=4,
                                   source=workdir)
  return path, meta


def _check_outputs(output, stem, size, num_classes):
  ids = Image.open(os.path.join(output, f'{stem}.png'))
  assert ids.mode == 'L' and ids.size == size
  assert np.asarray(ids).max() < num_classes
  color = Image.open(os.path.join(output, f'{stem}_color.png'))
  assert color.mode == 'P' and color.size == size
  # A palette PNG: its pixel values are the class ids themselves.
  np.testing.assert_array_equal(np.asarray(color), np.asarray(ids))
  overlay = Image.open(os.path.join(output, f'{stem}_overlay.png'))
  assert overlay.mode == 'RGB' and overlay.size == size


def test_bad_files_are_named_and_the_rest_processed(checkpoint, tmp_path,
                                                    capsys):
  path, meta = checkpoint
  inputs = tmp_path / 'in'
  inputs.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8)).save(
      inputs / 'good.png')
  Image.fromarray(rng.integers(0, 255, (30, 41), np.uint8)).save(
      inputs / 'gray.jpg')  # Greyscale: converted to RGB.
  (inputs / 'broken.jpg').write_bytes(b'not an image')
  output = str(tmp_path / 'out')
  status = predict.run(path, output, [str(inputs), str(tmp_path / 'nope')])
  assert status == 1
  errors = capsys.readouterr().err
  assert 'broken.jpg' in errors and 'cannot read' in errors
  assert 'nope: no such file' in errors
  # Not a terminal: one summary line with the total (3 files found).
  assert 'predict: 3/3 images in ' in errors and '\r' not in errors
  _check_outputs(output, 'good', (70, 50), meta.num_classes)
  _check_outputs(output, 'gray', (41, 30), meta.num_classes)
  assert not os.path.exists(os.path.join(output, 'broken.png'))


def test_predict_voc_sample(checkpoint, shared_data, tmp_path):
  """Real photos (500 px, larger than the smoke canvas); exit status 0."""
  path, meta = checkpoint
  images = os.path.join(shared_data, 'voc_sample', 'JPEGImages')
  if not os.path.isdir(images):
    pytest.skip(f'{images} not present')
  output = str(tmp_path / 'out')
  assert predict.run(path, output, [images]) == 0
  for name in sorted(os.listdir(images)):
    with Image.open(os.path.join(images, name)) as image:
      size = image.size
    _check_outputs(output, os.path.splitext(name)[0], size, meta.num_classes)


def test_canvas_choice():
  assert predict.canvas_for(50, 96, (96, 96), 64) == (96, 96)
  assert predict.canvas_for(375, 500, (96, 96), 64) == (384, 512)
  assert predict.canvas_for(97, 10, (96, 96), 64) == (128, 64)
