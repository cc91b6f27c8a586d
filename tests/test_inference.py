"""Tests of pan_jax.inference: padded canvases, multi-scale, flip, slide."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eval_standins
from pan_jax import inference
from pan_jax.models import layers

NUM_CLASSES = 5


def _model(module_class, channels=3):
  module = module_class(num_classes=NUM_CLASSES)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, channels)))
  return functools.partial(_apply, module, variables)


def _apply(module, variables, images, image_sizes):
  return module.apply(variables, images, train=False, image_sizes=image_sizes)


def _canvas(rng, sizes, canvas, garbage=True):
  """Random images at `sizes` on a canvas; padding is garbage, not zeros."""
  batch = len(sizes)
  images = rng.normal(size=(batch,) + tuple(canvas) + (3,)).astype(np.float32)
  exact = []
  for b, (h, w) in enumerate(sizes):
    exact.append(images[b, :h, :w].copy())
    if not garbage:
      images[b, h:] = 0
      images[b, :, w:] = 0
  return images, np.asarray(sizes, np.int32), exact


@pytest.mark.parametrize('shape', [(16, 20), (40, 24), (9, 9)])
def test_multiscale_resize_equals_resize_of_the_crop(shape):
  """The per-image resize multi-scale relies on ignores the padding."""
  rng = np.random.default_rng(0)
  sizes = [(13, 17), (20, 11), (1, 5)]
  images, sizes, exact = _canvas(rng, sizes, (20, 17))
  new_sizes = np.array([[min(shape[0], 2 * h), max(1, w - 3)]
                        for h, w in sizes], np.int32)
  new_sizes = np.minimum(new_sizes, shape)
  out = np.asarray(jax.jit(
      lambda x, s, t: layers.resize(x, shape, src_sizes=s, dst_sizes=t))(
          images, sizes, new_sizes))
  for b, (h, w) in enumerate(new_sizes):
    expected = jax.image.resize(exact[b], (h, w, 3), 'bilinear',
                                antialias=False)
    np.testing.assert_allclose(out[b, :h, :w], expected, atol=1e-5)
    assert not out[b, h:].any() and not out[b, :, w:].any()


def test_flip_valid():
  rng = np.random.default_rng(1)
  images, sizes, exact = _canvas(rng, [(4, 6), (7, 3)], (7, 6))
  flipped = np.asarray(inference.flip_valid(jnp.asarray(images),
                                            jnp.asarray(sizes[:, 1])))
  for b, (h, w) in enumerate(sizes):
    np.testing.assert_array_equal(flipped[b, :h, :w], exact[b][:, ::-1])
    np.testing.assert_array_equal(flipped[b, :, w:], images[b, :, w:])


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_padded_canvas_equals_exact_size_multiscale_flip(mode):
  """Padding never leaks in: each image alone at its size gives the same."""
  apply_fn = _model(eval_standins.ConvPool)
  options = inference.InferenceOptions(
      mode=mode, scales=(0.5, 1.5), flip=True, window_size=(16, 16),
      window_stride=(12, 12))
  rng = np.random.default_rng(2)
  images, sizes, exact = _canvas(rng, [(24, 30), (11, 27)], (24, 32))
  predict_probs = jax.jit(functools.partial(inference.predict_probs, apply_fn,
                                            options=options))
  probs = predict_probs(images, sizes)
  for b, (h, w) in enumerate(sizes):
    alone = predict_probs(exact[b][None], np.asarray([[h, w]], np.int32))
    np.testing.assert_allclose(probs[b, :h, :w], alone[0], atol=2e-5)
  np.testing.assert_allclose(
      probs[0, :24, :30].sum(-1), np.ones((24, 30)), atol=1e-5)


def test_flip_of_flip_equivariant_model_changes_nothing():
  apply_fn = _model(eval_standins.Pointwise)
  rng = np.random.default_rng(3)
  images, sizes, _ = _canvas(rng, [(10, 12), (6, 5)], (10, 12))
  predict_probs = jax.jit(functools.partial(inference.predict_probs,
                                            apply_fn), static_argnums=2)
  plain = predict_probs(images, sizes, inference.InferenceOptions())
  flipped = predict_probs(images, sizes, inference.InferenceOptions(flip=True))
  for b, (h, w) in enumerate(sizes):
    np.testing.assert_allclose(flipped[b, :h, :w], plain[b, :h, :w],
                               atol=1e-6)


def test_slide_equals_whole_when_one_window_covers_the_image():
  apply_fn = _model(eval_standins.ConvPool)
  rng = np.random.default_rng(4)
  images, sizes, _ = _canvas(rng, [(16, 16), (9, 13)], (16, 16))
  predict_probs = jax.jit(functools.partial(inference.predict_probs,
                                            apply_fn), static_argnums=2)
  whole = predict_probs(images, sizes, inference.InferenceOptions())
  # Window == canvas: the very same computation.
  same = predict_probs(
      images, sizes,
      inference.InferenceOptions(mode='slide', window_size=(16, 16),
                                 window_stride=(8, 8)))
  for b, (h, w) in enumerate(sizes):
    np.testing.assert_array_equal(same[b, :h, :w], whole[b, :h, :w])
  # Window larger than the canvas: the window is padded, the model masks it.
  larger = predict_probs(
      images, sizes,
      inference.InferenceOptions(mode='slide', window_size=(24, 20),
                                 window_stride=(8, 8)))
  for b, (h, w) in enumerate(sizes):
    np.testing.assert_allclose(larger[b, :h, :w], whole[b, :h, :w],
                               atol=1e-5)


def _reference_slide(apply_fn, image, window, stride):
  apply_fn = jax.jit(apply_fn)
  """MMSegmentation's slide_inference in NumPy, averaging probabilities."""
  h, w = image.shape[:2]
  total = np.zeros((h, w, NUM_CLASSES))
  count = np.zeros((h, w, 1))
  for row in range(inference.num_windows(h, window[0], stride[0])):
    for col in range(inference.num_windows(w, window[1], stride[1])):
      y2 = min(row * stride[0] + window[0], h)
      x2 = min(col * stride[1] + window[1], w)
      y1, x1 = max(y2 - window[0], 0), max(x2 - window[1], 0)
      crop = image[y1:y2, x1:x2][None]
      logits = apply_fn(crop, jnp.asarray([crop.shape[1:3]]))
      total[y1:y2, x1:x2] += np.asarray(jax.nn.softmax(logits, -1))[0]
      count[y1:y2, x1:x2] += 1
  return total / count


def test_slide_matches_reference_window_placement():
  apply_fn = _model(eval_standins.ConvPool)
  window, stride = (16, 20), (10, 12)
  options = inference.InferenceOptions(mode='slide', window_size=window,
                                       window_stride=stride)
  rng = np.random.default_rng(5)
  images, sizes, exact = _canvas(rng, [(30, 44), (21, 15), (12, 44)],
                                 (30, 44))
  probs = jax.jit(functools.partial(inference.predict_probs, apply_fn,
                                    options=options))(images, sizes)
  for b, (h, w) in enumerate(sizes):
    expected = _reference_slide(apply_fn, exact[b], window, stride)
    np.testing.assert_allclose(probs[b, :h, :w], expected, atol=2e-5)


def test_predict_is_argmax_and_options_validate():
  apply_fn = _model(eval_standins.Pointwise)
  images = np.random.default_rng(6).normal(size=(2, 8, 8, 3)).astype(
      np.float32)
  sizes = np.array([[8, 8], [5, 7]], np.int32)
  options = inference.InferenceOptions()
  classes = inference.predict(apply_fn, images, sizes, options)
  assert classes.dtype == jnp.int32 and classes.shape == (2, 8, 8)
  np.testing.assert_array_equal(
      classes, np.argmax(apply_fn(images, sizes), -1))
  with pytest.raises(ValueError, match='mode'):
    inference.InferenceOptions(mode='tiles')
  with pytest.raises(ValueError, match='window_stride'):
    inference.InferenceOptions(window_size=(8, 8), window_stride=(9, 8))
  # JSON configs give lists; options stay hashable (static jit arguments).
  assert hash(inference.InferenceOptions(scales=[0.5, 1], window_size=[4, 4],
                                         window_stride=[2, 2]))


def test_real_model_padding_invariance_multiscale_flip():
  """The PAN itself (smoke size): padded canvas == the image at its size."""
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from pan_jax import models  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  model = models.create_model(config, num_classes=NUM_CLASSES)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)))

  def apply_fn(images, image_sizes):
    # Random weights give logits in the hundreds (one-hot softmax); scaling
    # them down keeps the probabilities sensitive to any difference.
    return _apply(model, variables, images, image_sizes) / 100

  options = inference.InferenceOptions(scales=(0.75,), flip=True)
  rng = np.random.default_rng(7)
  # Even valid sizes at stride 2 and 4 (34x38 after scaling) once leaked
  # valid pixels into the padding through the stem's max-pool.
  images, sizes, exact = _canvas(rng, [(48, 56), (45, 51)], (48, 56))
  predict_probs = jax.jit(functools.partial(inference.predict_probs, apply_fn,
                                            options=options))
  probs = predict_probs(images, sizes)
  alone = predict_probs(exact[1][None], sizes[1:])
  np.testing.assert_allclose(probs[1, :45, :51], alone[0], atol=1e-5)


def _padded_reference(apply_fn, image, divisor, minimum=(1, 1)):
  """The network on the image zero-padded (= mean padded) bottom/right."""
  h, w = image.shape[:2]
  ph = -(-max(h, minimum[0]) // divisor) * divisor
  pw = -(-max(w, minimum[1]) // divisor) * divisor
  padded = np.zeros((1, ph, pw, 3), np.float32)
  padded[0, :h, :w] = image
  logits = apply_fn(jnp.asarray(padded), jnp.asarray([[ph, pw]], np.int32))
  return np.asarray(jax.nn.softmax(logits, -1))[0, :h, :w]


@pytest.mark.parametrize('padding,minimum', [('divisor', (1, 1)),
                                             ('crop', (16, 24))])
def test_divisor_and_crop_padding_let_the_network_see_mean_padding(
    padding, minimum):
  """MMSegmentation's size_divisor / PSPNet's pad-to-crop protocols."""
  apply_fn = _model(eval_standins.ConvPool)
  options = inference.InferenceOptions(padding=padding, size_divisor=8,
                                       window_size=minimum,
                                       window_stride=minimum)
  rng = np.random.default_rng(8)
  # Garbage in the canvas padding: the protocol pads with the mean (0).
  images, sizes, exact = _canvas(rng, [(13, 17), (24, 30), (5, 9)], (24, 32))
  probs = jax.jit(functools.partial(inference.predict_probs, apply_fn,
                                    options=options))(images, sizes)
  exact_probs = jax.jit(functools.partial(
      inference.predict_probs, apply_fn,
      options=inference.InferenceOptions()))(images, sizes)
  for b, (h, w) in enumerate(sizes):
    expected = _padded_reference(apply_fn, exact[b], 8, minimum)
    np.testing.assert_allclose(probs[b, :h, :w], expected, atol=2e-5)
  # 13x17 is padded (to 16x24): the network sees it, so the protocols differ.
  assert np.abs(probs[0, :13, :17] - exact_probs[0, :13, :17]).max() > 1e-3


def test_divisor_padding_composes_with_scales_flip_and_slide():
  """A per-pixel model cannot see padding: every protocol agrees exactly."""
  apply_fn = _model(eval_standins.Pointwise)
  rng = np.random.default_rng(9)
  images, sizes, _ = _canvas(rng, [(21, 30), (11, 13)], (24, 32))
  for mode in ('whole', 'slide'):
    common = dict(mode=mode, scales=(0.75, 1.25), flip=True,
                  window_size=(16, 16), window_stride=(12, 12))
    results = [jax.jit(functools.partial(
        inference.predict_probs, apply_fn,
        options=inference.InferenceOptions(padding=p, size_divisor=7,
                                           **common)))(images, sizes)
               for p in ('exact', 'divisor', 'crop')]
    for b, (h, w) in enumerate(sizes):
      for other in results[1:]:
        np.testing.assert_allclose(other[b, :h, :w], results[0][b, :h, :w],
                                   atol=1e-5)


def test_padding_options_validate():
  with pytest.raises(ValueError, match='config.eval.padding'):
    inference.InferenceOptions(padding='reflect')
  with pytest.raises(ValueError, match='size_divisor'):
    inference.InferenceOptions(padding='divisor', size_divisor=0)
