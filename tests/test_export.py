"""Tests of pan_jax.export: inference checkpoints and the StableHLO artefact."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import eval_standins
from pan_jax import checkpoints
from pan_jax import defaults
from pan_jax import export
from pan_jax.checkpoints import files


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
