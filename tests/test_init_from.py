"""Training starts from a converted / exported checkpoint (model.init_from)."""

import jax
import numpy as np
import pytest

from configs import smoke
from pan_jax import models
from pan_jax import optim
from pan_jax import sharding
from pan_jax import train
from pan_jax.checkpoints import exported
from pan_jax.data import sources


def _fresh_state(config, seed):
  meta = sources.get_meta(config.data)
  model = models.create_model(config, meta.num_classes)
  return train.create_train_state(jax.random.key(seed), config, model,
                                  optim.create_optimizer(config)), meta


def _export_donor(config, tmp_path):
  """A seed-1 network saved as an inference checkpoint: (state, its path)."""
  donor, meta = _fresh_state(config, seed=1)
  path = str(tmp_path / 'export')
  exported.save(
      path, config, meta,
      {'params': donor.params, 'batch_stats': donor.batch_stats})
  return donor, path


def test_init_from_loads_the_saved_network_onto_the_mesh(tmp_path):
  config = smoke.get_config()
  donor, path = _export_donor(config, tmp_path)

  state, _ = _fresh_state(config, seed=0)
  mesh = sharding.make_mesh()
  config.model.init_from = path
  loaded = train._load_pretrained(state, config, mesh)  # pylint: disable=protected-access
  for got, want in zip(jax.tree.leaves(loaded.params),
                       jax.tree.leaves(donor.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding.is_fully_replicated
    assert len(got.sharding.device_set) == jax.device_count()
  # The optimiser state and step are the fresh ones.
  assert int(loaded.step) == 0


def test_init_from_refuses_an_incompatible_model(tmp_path):
  _, path = _export_donor(smoke.get_config(), tmp_path)
  other = smoke.get_config()
  other.model.decoder_channels = 24
  state, _ = _fresh_state(other, seed=0)
  other.model.init_from = path
  with pytest.raises(ValueError, match='decoder_channels'):
    train._load_pretrained(state, other, sharding.make_mesh())  # pylint: disable=protected-access


@pytest.mark.slow
def test_finetune_stage_starts_from_a_workdir_with_a_fresh_step_and_optimiser(
    tmp_path, monkeypatch):
  """configs/voc.py:finetune's mechanism: init_from = stage 1's workdir."""
  # pylint: disable=g-import-not-at-top
  import json
  from configs import voc
  from pan_jax import errors
  from pan_jax.checkpoints import workdir as workdir_lib
  # pylint: enable=g-import-not-at-top
  monkeypatch.setattr(train, 'validate', lambda *args: {
      'miou': 0.5, 'pixel_accuracy': 0.5, 'mean_accuracy': 0.5})
  stage1 = smoke.get_config()
  stage1.total_steps = 2
  stage1.eval_every_steps = 0
  donor = str(tmp_path / 'stage1')
  train.train_and_evaluate(stage1, donor)
  donor_variables, donor_step = workdir_lib.restore_variables(donor)
  assert donor_step == 2

  # Stage 2 is the same network on other data (the fake set has no
  # trainval split, so train on its train split here).
  stage2 = voc.finetune(smoke.get_config())
  stage2.data.train_split = 'train'
  stage2.model.require_init_from = True
  stage2.total_steps = 1
  with pytest.raises(errors.ConfigError, match='init_from'):
    train.train_and_evaluate(stage2, str(tmp_path / 'refused'))
  assert not (tmp_path / 'refused').exists()
  stage2.model.init_from = donor

  fresh, _ = _fresh_state(stage2, seed=0)
  loaded = train._load_pretrained(fresh, stage2, sharding.make_mesh())  # pylint: disable=protected-access
  for got, want in zip(jax.tree.leaves(loaded.params),
                       jax.tree.leaves(donor_variables['params'])):
    np.testing.assert_array_equal(np.asarray(got), want)
  for got, want in zip(jax.tree.leaves(loaded.batch_stats),
                       jax.tree.leaves(donor_variables['batch_stats'])):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert int(loaded.step) == 0
  # SGD's momentum starts at zero, not at stage 1's.
  assert all(not np.asarray(x).any()
             for x in jax.tree.leaves(loaded.opt_state))

  run = tmp_path / 'stage2'
  assert train.train_and_evaluate(stage2, str(run))['step'] == 1
  assert workdir_lib.restore_variables(str(run))[1] == 1
  first = json.loads((run / 'metrics.jsonl').read_text().splitlines()[0])
  # The schedule restarts at stage 2's lr0 (poly at step 0).
  assert first['step'] == 1
  assert first['learning_rate'] == pytest.approx(voc.FINETUNE[
      'optim.learning_rate'])
