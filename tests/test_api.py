"""Tests of the one-call API, pan_jax.load: README block, docstring, batches."""

import doctest
import os
import re

import numpy as np
from PIL import Image
import pytest

import eval_standins
import pan_jax
from pan_jax import predict
from pan_jax.checkpoints import exported

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """An inference checkpoint of the smoke model (canvas 96 x 96, 6 classes)."""
  workdir, config, meta, _, variables = eval_standins.smoke_workdir()
  path = str(tmp_path_factory.mktemp('api') / 'export')
  exported.save(path, config, meta, variables, step=4, source=workdir)
  return path


def _image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                              dtype=np.uint8)


def _readme_block():
  """The README's python block that calls pan_jax.load."""
  with open(os.path.join(REPO, 'README.md')) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
  found = [b for b in blocks if 'pan_jax.load(' in b]
  assert len(found) == 1, 'one README block shows pan_jax.load'
  return found[0]


def test_readme_example_runs(checkpoint, tmp_path, capsys):
  code = _readme_block()
  photo = tmp_path / 'photo.png'
  Image.fromarray(_image(90, 80)).save(photo)
  assert "'runs/demo'" in code and "'photo.jpg'" in code
  code = code.replace("'runs/demo'", repr(checkpoint)).replace(
      "'photo.jpg'", repr(str(photo)))
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  assert scope['mask'].shape == (90, 80) and scope['mask'].dtype == np.uint8
  assert [m.shape for m in scope['masks']] == [(90, 80), (90, 80)]
  assert scope['probs'].shape == (90, 80, 6)
  np.testing.assert_allclose(scope['probs'].sum(-1), 1, rtol=1e-5)
  assert scope['tta'].options.scales == (0.75, 1.0, 1.25)
  assert scope['tta'].options.flip
  printed = capsys.readouterr().out
  assert sum(eval(printed).values()) == 90 * 80  # pylint: disable=eval-used


def test_docstring_examples(checkpoint):
  finder = doctest.DocTestFinder()
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  tests = finder.find(pan_jax.load, 'pan_jax.load', globs={
      'pan_jax': pan_jax, 'path': checkpoint, 'image': _image(120, 160)})
  assert tests and tests[0].examples
  for test in tests:
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0 and result.attempted >= 6


def test_batches_give_what_single_images_give(checkpoint):
  predictor = pan_jax.load(checkpoint, batch_size=2)
  # Two canvases (96 x 96 for the small ones, 128 x 160 for the large one)
  # and three images on the small canvas: batches of 2, then 1.
  images = [_image(50, 70, 1), _image(120, 150, 2), _image(96, 96, 3),
            _image(30, 41, 4)]
  singles = [predictor(image) for image in images]
  batched = predictor(images)
  assert [m.shape for m in batched] == [i.shape[:2] for i in images]
  for one, many in zip(singles, batched):
    np.testing.assert_array_equal(one, many)
  probs = predictor.probabilities(images)
  for image, p in zip(images, probs):
    # Other batch sizes compile to other kernels: equal up to rounding.
    np.testing.assert_allclose(p, predictor.probabilities(image), atol=1e-4)
  # An [N, H, W, 3] array gives an [N, H, W] array.
  stack = np.stack([_image(40, 60, seed) for seed in range(3)])
  masks = predictor(stack)
  assert isinstance(masks, np.ndarray) and masks.shape == (3, 40, 60)
  np.testing.assert_array_equal(masks[1], predictor(stack[1]))
  assert predictor.probabilities(stack).shape == (3, 40, 60, 6)


def test_options_come_from_the_arguments_or_the_config(checkpoint):
  plain = pan_jax.load(checkpoint)
  assert plain.options.scales == (1.0,) and not plain.options.flip
  assert plain.meta.num_classes == len(plain.class_names) == 6
  assert isinstance(plain, predict.Predictor)
  tta = pan_jax.load(checkpoint, scales=(0.5, 1.0), flip=True)
  assert (tta.options.scales, tta.options.flip) == ((0.5, 1.0), True)
  assert pan_jax.load(checkpoint, mode='slide').options.mode == 'slide'
  image = _image(60, 80)
  probs = tta.probabilities(image)
  assert probs.shape == (60, 80, 6)
  np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-5)


def test_wrong_images_are_named(checkpoint):
  predictor = pan_jax.load(checkpoint)
  with pytest.raises(ValueError, match=r'expected uint8 RGB \[H, W, 3\].*'
                                       r'got float32 \(20, 30, 3\)'):
    predictor(np.zeros((20, 30, 3), np.float32))
  with pytest.raises(ValueError, match=r'image 1: expected uint8 RGB.*'
                                       r'\(20, 30\)'):
    predictor([_image(20, 30), np.zeros((20, 30), np.uint8)])
  with pytest.raises(ValueError, match='at least one image'):
    predictor([])
  with pytest.raises(FileNotFoundError, match='does not exist'):
    pan_jax.load(os.path.join(checkpoint, 'missing'))
