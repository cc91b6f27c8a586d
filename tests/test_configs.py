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
from configs import voc
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


def _paper_description(table, label):
  """What the paper's row label says the network is (parsed here, not read
  from configs/ablation.py): centre, decoder, kernels, pooling, GP, GAU."""
  naive = {'decoder': 'bilinear'}
  if label == 'ResNet101':
    return {**naive, 'center': 'none'}
  if label == 'ResNet101+SE':
    return {**naive, 'center': 'se', 'gp': False}
  if table == 2 and label in ('PSPNet', 'DeepLabv3'):
    return {**naive, 'center': {'PSPNet': 'ppm', 'DeepLabv3': 'aspp'}[label]}
  if table == 2 and label == 'FPA':
    label = 'C357+AVE+GP'  # The paper's best FPA setting (Table 1).
  if label.startswith('C'):
    kernels, pooling, *gp = label.split('+')
    # Fig. 3: 7x7 on the finest pyramid level, 3x3 on the coarsest.
    return {**naive, 'center': 'pyramid',
            'kernels': tuple(sorted((int(k) for k in kernels[1:]),
                                    reverse=True)),
            'pooling': {'MAX': 'max', 'AVE': 'avg'}[pooling],
            'gp': gp == ['GP']}
  if table == 3 and label.startswith('ResNet101+GAU ('):
    gp, kernel = label[len('ResNet101+GAU ('):-1].split(', ')
    # Table 3 is built on the ResNet101 baseline: no FPA.
    return {'center': 'none', 'decoder': 'gau', 'gau_context': gp == 'GP',
            'low_level_kernel': {'1x1': 1, '3x3': 3}[kernel]}
  raise AssertionError(f'Table {table}: no description for row {label!r}')


_TABLE_ROWS = [(table, row['label'], row['run'])
               for table, spec in ablation.TABLES.items()
               for row in spec['rows']]


@pytest.mark.parametrize('table,label,run', _TABLE_ROWS)
def test_every_table_row_builds_the_network_the_paper_describes(
    table, label, run):
  want = _paper_description(table, label)
  config = ablation.get_config(run)
  model_config = config.model
  # The paper's base: dilated ResNet-101 at output stride 16, VOC recipe.
  assert (model_config.backbone, model_config.output_stride) == (
      'resnet101', 16)
  assert config.data.name == 'voc2012_aug' and config.data.crop_size == 512
  model = models.create_model(shrink(config), 4)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))['params']
  center = params['center']
  if want['center'] == 'none':
    assert set(center) == {'proj'}
  elif want['center'] == 'ppm':
    assert set(center) == {'pool1', 'pool2', 'pool3', 'pool6', 'bottleneck'}
  elif want['center'] == 'aspp':
    assert set(center) == {'conv1x1', 'atrous6', 'atrous12', 'atrous18',
                           'image_pool', 'project'}
  elif want['center'] == 'se':
    assert {'se_reduce', 'se_expand'} <= set(center)
    assert 'down1' not in center
  else:
    kernels = tuple(center[f'down{i}']['conv']['kernel'].shape[0]
                    for i in (1, 2, 3))
    assert kernels == want['kernels']
    assert model.center.keywords['pooling'] == want['pooling']
    assert model.center.keywords['attention'] == 'pyramid'
  if 'gp' in want:
    assert ('glob' in center) == want['gp']
  gau_stages = {name for name in params if name.startswith('gau')}
  if want['decoder'] == 'bilinear':
    assert not gau_stages
  else:
    assert gau_stages == {'gau1', 'gau2', 'gau3'}
    for stage in gau_stages:
      kernel = params[stage]['low']['conv']['kernel'].shape[:2]
      assert kernel == (want['low_level_kernel'],) * 2
      assert ('context' in params[stage]) == want['gau_context']


def test_tables_have_every_row_once_and_each_network_once():
  assert [len(t['rows']) for t in ablation.TABLES.values()] == [10, 3, 4]
  for spec in ablation.TABLES.values():
    runs = [row['run'] for row in spec['rows']]
    labels = [row['label'] for row in spec['rows']]
    assert len(set(runs)) == len(runs) and len(set(labels)) == len(labels)
  # Every variant is some table's row; no two variants are one network.
  assert set(ablation.runs()) == set(ablation.VARIANTS)
  networks = {ablation.get_config(v).model.to_json(): v
              for v in ablation.VARIANTS}
  assert len(networks) == len(ablation.VARIANTS)
  # Shared rows: Table 3's baseline is Table 1's, Table 2's FPA Table 1's best.
  assert ablation.TABLES[3]['rows'][0]['run'] == 't1_baseline'
  assert ablation.TABLES[2]['rows'][2]['run'] == 't1_c357_avg_gp'


def test_table_numbers_are_the_quoted_ones_or_none():
  table3 = [(r['miou'], r['pixel_accuracy'])
            for r in ablation.TABLES[3]['rows']]
  assert table3 == [(72.60, None), (73.56, None), (77.48, None),
                    (77.84, None)]
  for spec in ablation.TABLES.values():
    for row in spec['rows']:
      for value in (row['miou'], row['pixel_accuracy']):
        assert value is None or 50 < value < 100


def test_ablation_sweep_adds_each_network_once_by_name():
  points = []
  ablation.sweep(lambda **kwargs: points.append(kwargs))
  assert [p['name'] for p in points] == list(ablation.VARIANTS)
  assert all(p == {'name': p['name'], 'config_arg': p['name']}
             for p in points)
  table3 = []
  ablation.sweep(lambda **kwargs: table3.append(kwargs['name']), table=3)
  assert table3 == ['t1_baseline', 't3_skip_3x3', 't3_gau_1x1',
                    't3_gau_3x3']
  with pytest.raises(ValueError, match='no table 4'):
    ablation.runs(4)


def test_unknown_ablation_variant_lists_valid_ones():
  with pytest.raises(ValueError, match='t1_c357_avg_gp'):
    ablation.get_config('t9_nonsense')


def test_paper_recipes_require_init_from():
  for path in ('configs/voc.py', 'configs/cityscapes.py',
               'configs/ablation.py', 'configs/smp_pan.py'):
    assert load(path).model.require_init_from, path
  for path in ('configs/base.py', 'configs/demo.py', 'configs/smoke.py'):
    assert not load(path).model.require_init_from, path


def test_voc_finetune_stage():
  stage1, stage2 = voc.get_config(), voc.get_config('finetune')
  assert stage2.data.train_split == 'trainval'
  assert stage1.data.train_split == 'train_aug'
  assert stage2.model == stage1.model  # Loads stage 1's network as is.
  assert stage2.model.require_init_from and stage2.eval_every_steps == 0
  assert stage2.optim.learning_rate < stage1.optim.learning_rate
  assert voc.get_config('resnet50,finetune').model.backbone == 'resnet50'
  with pytest.raises(ValueError, match='neither "finetune" nor a backbone'):
    voc.get_config('finetun')


def _paths(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from _paths(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'
