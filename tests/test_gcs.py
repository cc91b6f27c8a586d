"""pan_jax's files on gs://, against the local GCS server (one process).

Every directory pan_jax writes or reads is exercised in a bucket without
training: atomic JSON and the listing cache (paths.py), a dataset prepared
into a bucket and read through its verified local copy (data/builder.py,
sources.py), inference checkpoints and converted backbones with their
commit markers (checkpoints/), the resume check of a gs:// workdir, the
evaluation report and PNGs, and predict's inputs. Training, evaluation,
export and predict end to end on gs:// (several processes) are in
tests/test_multihost.py.

Needs requirements-gcs.txt; skipped without it (see gcs_server.py).
"""

import json
import os
import subprocess
import sys

from configs import smoke
from etils import epath
import jax
import numpy as np
import pytest

import eval_standins
from pan_jax import checkpoints
from pan_jax import errors
from pan_jax import evaluate
from pan_jax import paths
from pan_jax import predict
from pan_jax import visualize
from pan_jax.checkpoints import exported
from pan_jax.checkpoints import files
from pan_jax.checkpoints import pretrained
from pan_jax.checkpoints import workdir as workdir_lib
from pan_jax.data import builder
from pan_jax.data import prepare
from pan_jax.data import sources

pytest.importorskip('gcsfs', reason='pip install -r requirements-gcs.txt')


def _write_elsewhere(path, text):
  """Writes `path` from another process (its own gcsfs, its own cache)."""
  subprocess.run([sys.executable, '-c', 'import sys; from etils import epath;'
                  ' epath.Path(sys.argv[1]).write_text(sys.argv[2])',
                  path, text], check=True, timeout=120)


def test_files_and_listings(gcs_bucket, tmp_path):
  run = f'{gcs_bucket}/run'
  files.write_json(f'{run}/config.json', {'a': 1})
  assert files.read_json(f'{run}/config.json') == {'a': 1}
  assert paths.isdir(run) and paths.isfile(f'{run}/config.json')
  assert paths.listdir(run) == ['config.json']
  # Another process's file is seen at once (gcsfs alone would hide it).
  _write_elsewhere(f'{run}/other.txt', 'x')
  assert paths.exists(f'{run}/other.txt')
  assert paths.listdir(run) == ['config.json', 'other.txt']
  assert paths.absolute(run) == run  # URLs stay URLs.
  # Local files are atomic too and nothing lands in ./gs:/.
  paths.write_bytes(str(tmp_path / 'a' / 'b.bin'), b'12')
  assert (tmp_path / 'a' / 'b.bin').read_bytes() == b'12'
  assert os.listdir(tmp_path / 'a') == ['b.bin']
  assert not os.path.exists('gs:')
  paths.rmtree(run)
  assert not paths.exists(run)


@pytest.fixture
def synthetic_in_bucket(gcs_bucket, tmp_path):
  """A tiny synthetic dataset prepared into the bucket: (data_dir, cache)."""
  data_dir = f'{gcs_bucket}/data'
  build_cache = str(tmp_path / 'build_cache')
  path, skipped, _, already = prepare.prepare(
      'synthetic', str(tmp_path / 'src'), data_dir, num_train=6, num_val=3,
      cache_dir=build_cache)
  assert path == f'{data_dir}/synthetic/1.0.0' and not skipped
  assert not already
  return data_dir, build_cache


def test_prepare_into_a_bucket_and_read_its_local_copy(synthetic_in_bucket,
                                                       tmp_path):
  data_dir, build_cache = synthetic_in_bucket
  remote = builder.built_dir(data_dir, 'synthetic')
  assert remote == f'{data_dir}/synthetic/1.0.0'
  assert builder.INFO_FILE in paths.listdir(remote)
  # Again: already built, nothing rebuilt.
  assert prepare.prepare('synthetic', str(tmp_path / 'src'), data_dir,
                         num_train=6, num_val=3, cache_dir=build_cache)[3]
  config = smoke.get_config()
  config.data.name = 'synthetic'
  config.data.data_dir = data_dir
  config.data.cache_dir = str(tmp_path / 'cache')
  meta = sources.get_meta(config.data)
  assert meta.name == 'synthetic' and meta.num_classes == 6
  train = sources.open_split(config.data, 'train')
  assert len(train) == 6 and train[0]['image'].dtype == np.uint8
  local = paths.cache_path(config.data.cache_dir, remote)
  assert sources.dataset_dir(config.data) == local
  assert sorted(os.listdir(local)) == sorted(
      paths.listdir(remote) + ['.pan_jax_copy.json'])
  # The host that prepared it has a current copy in its build cache: no
  # second download.
  assert not paths.mirror(remote,
                          paths.cache_path(build_cache, remote),
                          builder.INFO_FILE)
  # --overwrite rebuilds it (another val split) and replaces the bucket's.
  prepare.prepare('synthetic', str(tmp_path / 'src4'), data_dir, num_train=6,
                  num_val=4, cache_dir=build_cache, overwrite=True)
  config.data.cache_dir = str(tmp_path / 'cache4')
  assert len(sources.open_split(config.data, 'val')) == 4


def test_an_interrupted_dataset_upload_is_not_a_dataset(gcs_bucket, tmp_path,
                                                        monkeypatch):
  data_dir = f'{gcs_bucket}/data'

  def interrupted(local, url, marker):
    del local, marker
    paths.write_bytes(f'{url}/features.json', b'{}')
    raise ConnectionError('simulated interruption')

  monkeypatch.setattr(paths, 'upload_tree', interrupted)
  with pytest.raises(ConnectionError):
    prepare.prepare('synthetic', str(tmp_path / 'src'), data_dir,
                    num_train=4, num_val=2, cache_dir=str(tmp_path / 'c'))
  monkeypatch.undo()
  assert builder.built_dir(data_dir, 'synthetic') is None
  config = smoke.get_config()
  config.data.name = 'synthetic'
  config.data.data_dir = data_dir
  with pytest.raises(FileNotFoundError, match='not prepared in gs://'):
    sources.get_meta(config.data)
  # Rerunning uploads the local build made the first time.
  path, *_ = prepare.prepare('synthetic', str(tmp_path / 'src'), data_dir,
                             num_train=4, num_val=2,
                             cache_dir=str(tmp_path / 'c'))
  assert builder.built_dir(data_dir, 'synthetic') == path


def _variables(seed=0):
  rng = np.random.default_rng(seed)
  return {'params': {'backbone': {'w': rng.normal(size=(3, 4)).astype(
              np.float32)}, 'head': {'b': np.arange(4, dtype=np.float32)}},
          'batch_stats': {'backbone': {'mean': np.ones(4, np.float32)}}}


def test_inference_checkpoint_and_backbone_on_gcs(gcs_bucket):
  config = smoke.get_config()
  meta = sources.get_meta(config.data)
  path = f'{gcs_bucket}/export'
  exported.save(path, config, meta, _variables(), step=7, source='somewhere')
  assert paths.listdir(path) == ['config.json', 'dataset.json',
                                 'export.json', 'variables']
  loaded = checkpoints.load(path)
  assert loaded.step == 7 and loaded.meta == meta
  jax.tree.map(np.testing.assert_array_equal, loaded.variables, _variables())
  with pytest.raises(FileExistsError, match='already exists'):
    exported.save(path, config, meta, _variables())
  # Without its marker (written last) it is an interrupted export.
  epath.Path(f'{path}/export.json').unlink()
  assert not paths.exists(f'{path}/export.json')
  with pytest.raises(errors.MissingError, match='incomplete'):
    checkpoints.load(path)
  # A converted backbone: pretrained.json is its marker.
  backbone = f'{gcs_bucket}/converted'
  info = {'kind': 'backbone', 'source': {'format': 'timm', 'arch': 'x'},
          'model': {}}
  pretrained.save(backbone, _variables(1), info)
  assert pretrained.read_info(backbone) == info
  np.testing.assert_array_equal(
      pretrained.restore_variables(backbone)['params']['backbone']['w'],
      _variables(1)['params']['backbone']['w'])


def test_resume_check_of_a_gcs_workdir(gcs_bucket):
  config = smoke.get_config()
  run = f'{gcs_bucket}/run'
  workdir_lib.check_compatible(run, config)  # Nothing there yet.
  workdir_lib.save_run_info(run, config, {'num_classes': 4})
  paths.write_bytes(f'{run}/checkpoints/4/state/x', b'')
  config.model.backbone = 'resnet50'
  with pytest.raises(ValueError, match="model.backbone: saved 'resnet18'"):
    workdir_lib.check_compatible(run, config)


def test_evaluation_outputs_and_predict_inputs_on_gcs(gcs_bucket):
  meta = sources.get_meta(smoke.get_config().data)
  k = meta.num_classes
  result = {'miou': 0.5, 'pixel_accuracy': 0.75, 'mean_accuracy': 0.6,
            'per_class_iou': np.full(k, 0.5),
            'per_class_accuracy': np.full(k, 0.6),
            'confusion_matrix': np.eye(k, dtype=np.int64),
            'num_images': 1}
  sample = {'image': np.zeros((8, 8, 3), np.float32),
            'label': np.zeros((8, 8), np.uint8),
            'prediction': np.zeros((8, 8), np.int32), 'index': 3}
  output = f'{gcs_bucket}/eval'
  evaluate.write_outputs(output, result, meta, [sample], {'step': 1})
  assert paths.listdir(output) == ['confusion_matrix.png', 'overlays',
                                   'report.json']
  report = json.loads(paths.read_text(f'{output}/report.json'))
  assert report['miou'] == 0.5 and report['step'] == 1
  assert paths.listdir(f'{output}/overlays') == ['00003.png']
  # Images in a bucket are found and read; a missing one is named.
  image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
  visualize.save_png(f'{gcs_bucket}/images/a.png', image)
  paths.write_bytes(f'{gcs_bucket}/images/notes.txt', b'not an image')
  found, problems = predict.find_images([f'{gcs_bucket}/images',
                                         f'{gcs_bucket}/missing.png'])
  assert found == [f'{gcs_bucket}/images/a.png']
  assert problems == [f'{gcs_bucket}/missing.png: no such file or directory']
  np.testing.assert_array_equal(predict.read_image(found[0]), image)


def test_predict_writes_into_a_bucket(gcs_bucket):
  _, config, meta, model, variables = eval_standins.smoke_workdir()
  del config
  predictor = predict.Predictor(
      model, variables, predict.inference.InferenceOptions(),
      canvas_size=(64, 64), min_size=32)
  image = (np.arange(40 * 50 * 3) % 251).astype(np.uint8).reshape(40, 50, 3)
  visualize.save_png(f'{gcs_bucket}/in/x.png', image)
  output = f'{gcs_bucket}/out'
  assert not predict.predict_files(predictor, [f'{gcs_bucket}/in'], output,
                                   meta)
  assert paths.listdir(output) == ['x.png', 'x_color.png', 'x_overlay.png']
  ids = predict.read_image(f'{output}/x.png')[..., 0]
  np.testing.assert_array_equal(ids, predictor(image))
