"""Every config file and every ablation row loads, builds and runs."""

import glob
import os

import jax
import jax.numpy as jnp
from ml_collections import config_flags  # noqa: F401  (the user's loader)
from ml_collections.config_flags import config_flags as cf_impl
import pytest

from configs import ablation
from configs import base
from pan_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'configs',
                                                              '*.py'))
    if not p.endswith('__init__.py'))


def load(path):
  """Loads a config file the way `--config=path` does."""
  return cf_impl._ConfigFileParser(name='config').parse(  # pylint: disable=protected-access
      os.path.join(REPO, path))


def shrink(config):
  """Keeps the architecture choices, makes the widths tiny and fast."""
  config.model.backbone = 'resnet18'
  config.model.base_width = 8
  config.model.decoder_channels = min(config.model.decoder_channels, 8)
  if config.model.multi_grid and len(config.model.multi_grid) != 2:
    config.model.multi_grid = (1, 1)
  return config


def forward(config, size=64):
  model = models.create_model(config, 4)
  size = max(size, models.min_input_size(config))
  images = jnp.ones((1, size, size, 3))
  variables = model.init(jax.random.key(0), images)
  logits = model.apply(variables, images)
  assert logits.shape == (1, size, size, 4)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_config_files_are_found():
  assert {'configs/base.py', 'configs/voc.py', 'configs/cityscapes.py',
          'configs/smp_pan.py', 'configs/ablation.py',
          'configs/smoke.py'} <= set(CONFIG_FILES)


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_config_file_loads_locked_and_builds(path):
  config = load(path)
  config.lock()
  # Locked: a mistyped override fails instead of creating a field.
  with pytest.raises(AttributeError):
    config.model.bakbone = 'resnet50'
  # Same fields as the base config: no field that no code reads.
  assert sorted(_paths(config)) == sorted(_paths(base.get_config())), path
  forward(shrink(config))


@pytest.mark.parametrize('variant', list(ablation.VARIANTS))
def test_ablation_variant_builds_and_runs(variant):
  config = ablation.get_config(variant)
  for path, value in ablation.VARIANTS[variant].items():
    node = config
    for key in path.split('.'):
      node = node[key]
    assert node == value
  forward(shrink(config))


def test_ablation_sweep_adds_every_row():
  rows = []
  ablation.sweep(lambda **overrides: rows.append(overrides))
  assert rows == list(ablation.VARIANTS.values())
  assert len(rows) == len(ablation.VARIANTS) == 19


def test_unknown_ablation_variant_lists_valid_ones():
  with pytest.raises(ValueError, match='t1_c357_avg_gp'):
    ablation.get_config('t9_nonsense')


def _paths(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from _paths(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'
