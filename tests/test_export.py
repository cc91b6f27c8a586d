"""Tests of pan_jax.export: inference checkpoints and the StableHLO artefact."""

import http.server
import io
import json
import os
import shutil
import threading
import urllib.request

import jax
import numpy as np
import pytest

import eval_standins
from pan_jax import checkpoints
from pan_jax import defaults
from pan_jax import export
from pan_jax import predict
from pan_jax.checkpoints import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(workdir pieces, EXPORT directory) after `export.run(workdir, EXPORT)`."""
  run = eval_standins.smoke_workdir()
  output = str(tmp_path_factory.mktemp('export') / 'export')
  assert export.run(run[0], output) == 4
  return run, output


def _images(batch, size=64):
  rng = np.random.default_rng(batch)
  return rng.normal(size=(batch, size, size, 3)).astype(np.float32)


def test_workdir_and_export_load_the_same(exported):
  (workdir, config, meta, _, variables), output = exported
  for path in (workdir, output):
    loaded_config, loaded_meta, loaded_variables, step = checkpoints.load(path)
    assert step == 4
    assert loaded_meta == meta
    assert loaded_config.model.to_dict() == json.loads(
        config.model.to_json())
    assert set(loaded_variables) == {'params', 'batch_stats'}
    jax.tree.map(np.testing.assert_array_equal, loaded_variables, variables)
  # No optimiser state, nothing but the documented files.
  assert sorted(os.listdir(output)) == sorted([
      'config.json', 'dataset.json', 'export.json', 'model.json',
      'model.stablehlo', 'variables'])


def test_reload_gives_identical_logits(exported):
  (_, _, _, model, variables), output = exported
  images = _images(3)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  expected = np.asarray(apply(variables, images))
  _, _, reloaded, _ = checkpoints.load(output)
  np.testing.assert_array_equal(apply(reloaded, images), expected)
  # The StableHLO artefact, with only jax + orbax (as the README shows).
  artefact = export.load_stablehlo(output)
  assert artefact.in_avals[-1].shape[1:] == (64, 64, 3)  # images, last
  restored = files.read_variables(os.path.join(output, 'variables'))
  np.testing.assert_array_equal(artefact.call(restored, images), expected)
  # The batch dimension is symbolic: any batch size runs (compare with the
  # same batch size: XLA may pick other kernels, rounding otherwise).
  np.testing.assert_array_equal(artefact.call(restored, images[:1]),
                                apply(variables, images[:1]))
  info = json.loads(open(os.path.join(output, 'model.json')).read())
  assert info['logits'].startswith('float32 [b, 64, 64, 6]')
  assert set(info['platforms']) == {'cpu', 'cuda', 'tpu'}


def test_errors_name_the_problem(exported, tmp_path):
  (workdir, *_), output = exported
  with pytest.raises(FileExistsError, match='already exists'):
    export.run(workdir, output)
  with pytest.raises(FileNotFoundError, match='step 3'):
    checkpoints.load(workdir, step=3)
  with pytest.raises(ValueError, match='step 4'):
    checkpoints.load(output, step=5)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoints.load(str(tmp_path / 'missing'))
  with pytest.raises(FileNotFoundError, match='config.json'):
    checkpoints.load(str(tmp_path))
  assert not [p for p in os.listdir(os.path.dirname(output))
              if '.tmp' in p], 'no temporary directory left behind'


def test_old_config_gains_new_fields_with_their_defaults(exported, tmp_path):
  # A checkpoint written before a field existed still loads, and every
  # command can read the field (its default keeps the old behaviour).
  _, output = exported
  copy = tmp_path / 'old'
  shutil.copytree(output, copy)
  saved = json.loads((copy / 'config.json').read_text())
  del saved['eval']['num_overlays']
  del saved['optim']
  (copy / 'config.json').write_text(json.dumps(saved))
  config, *_ = checkpoints.load(str(copy))
  assert config.eval.num_overlays == defaults.get_config().eval.num_overlays
  assert config.optim.to_dict() == json.loads(
      defaults.get_config().optim.to_json())
  assert config.model.to_dict() == saved['model']


@pytest.fixture(scope='module')
def serving(tmp_path_factory):
  """EXPORT directory of `export.run(..., serving=True)`."""
  workdir = eval_standins.smoke_workdir()[0]
  output = str(tmp_path_factory.mktemp('serving') / 'export')
  assert export.run(workdir, output, serving=True) == 4
  return output


@pytest.fixture(scope='module')
def serving_predictor(serving):
  """The Predictor with the serving artefact's inference: one scale, whole."""
  return predict.load(serving, scales=(1.0,), flip=False, mode='whole')


def _uint8_images(batch, height, width, seed=0):
  return np.random.default_rng(seed).integers(
      0, 256, (batch, height, width, 3), dtype=np.uint8)


@pytest.mark.slow
def test_serving_artefact_gives_the_predictors_ids(serving, serving_predictor):
  artefact = export.load_stablehlo(serving)
  assert artefact.in_avals[-1].dtype == np.uint8
  assert str(artefact.in_avals[-1].shape) == '(b, h, w, 3)'
  assert set(artefact.platforms) == {'cpu', 'cuda', 'tpu'}
  variables = files.read_variables(os.path.join(serving, 'variables'))
  # Two sizes the Predictor pads to its 96 x 96 canvas (one odd), and one
  # beyond it (padded to 128 x 160); the artefact runs each at its size.
  for seed, (height, width) in enumerate([(64, 64), (75, 97), (128, 150)]):
    images = _uint8_images(2, height, width, seed)
    ids = artefact.call(variables, images)
    assert ids.dtype == np.int32 and ids.shape == (2, height, width)
    for image, image_ids in zip(images, np.asarray(ids)):
      np.testing.assert_array_equal(image_ids, serving_predictor(image))
  info = json.loads(open(os.path.join(serving, 'model.json')).read())
  assert info['call'] == 'exported.call(variables, images) -> ids'
  assert info['constraints'].startswith('b >= 1, H >= 32, W >= 32')
  with pytest.raises(ValueError):  # Below the constraint: refused.
    artefact.call(variables, _uint8_images(1, 31, 64))


def test_serving_example_serves(serving, serving_predictor):
  # model.json's example, also in the README, run as written: an HTTP
  # server on a free port, asked for one mask.
  info = json.loads(open(os.path.join(serving, 'model.json')).read())
  code = info['example']
  with open(os.path.join(REPO, 'README.md')) as f:
    assert code in f.read(), 'README shows the same example'
  assert "'/abs/path/EXPORT'" in code and "('', 8000)" in code
  code = code.replace("'/abs/path/EXPORT'", repr(serving)).replace(
      "('', 8000)", "('127.0.0.1', 0)").replace('server.serve_forever()\n', '')
  scope = {}
  exec(compile(code, 'model.json', 'exec'), scope)  # pylint: disable=exec-used
  server = scope['server']
  assert isinstance(server, http.server.HTTPServer)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    image = _uint8_images(1, 70, 90, seed=7)[0]
    body = io.BytesIO()
    np.save(body, image)
    request = urllib.request.Request(
        f'http://127.0.0.1:{server.server_address[1]}/', data=body.getvalue(),
        method='POST')
    with urllib.request.urlopen(request, timeout=300) as response:
      ids = np.load(io.BytesIO(response.read()))
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=30)
  np.testing.assert_array_equal(ids, serving_predictor(image))


def test_serving_logits(serving, tmp_path):
  workdir = eval_standins.smoke_workdir()[0]
  with pytest.raises(ValueError, match='--serving_logits needs --serving'):
    export.run(workdir, str(tmp_path / 'x'), serving_logits=True)
  assert not os.path.exists(tmp_path / 'x')
  output = str(tmp_path / 'logits')
  export.run(workdir, output, platforms=['cpu'], serving=True,
             serving_logits=True)
  info = json.loads(open(os.path.join(output, 'model.json')).read())
  assert info['call'] == 'exported.call(variables, images) -> (ids, logits)'
  assert info['logits'] == 'float32 [b, H, W, 6]'
  variables = files.read_variables(os.path.join(output, 'variables'))
  images = _uint8_images(1, 50, 60)
  ids, logits = export.load_stablehlo(output).call(variables, images)
  assert logits.dtype == np.float32 and logits.shape == (1, 50, 60, 6)
  np.testing.assert_array_equal(ids, export.load_stablehlo(serving).call(
      variables, images))


@pytest.mark.parametrize('overrides', [
    {'model.center': 'ppm'},
    {'model.center': 'aspp', 'model.decoder': 'bilinear'},
    {'model.fpa.ceil_mode': False, 'model.fpa.pooling': 'max',
     'model.align_corners': True},
])
def test_serving_export_traces_every_architecture(overrides):
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from pan_jax import models  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  defaults.override(config, overrides)
  model = models.create_model(config, 3)
  min_size = models.min_input_size(config)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, min_size, min_size, 3), np.float32),
      train=False))
  artefact = export.export_serving(model, variables, min_size, ('cpu',))
  assert str(artefact.out_avals[0].shape) == '(b, h, w)'
