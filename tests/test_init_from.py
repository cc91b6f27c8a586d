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
