"""Tests for pan_jax.train and pan_jax.main on configs/smoke.py (CPU).

The runs share one module fixture, because each costs a trace and compile:
  straight:    6 steps on 8 devices without interruption;
  interrupted: the same, stopped by a real SIGTERM during step 3, then
               resumed to 6 by rerunning on the same workdir;
  one_device:  the same as interrupted up to step 3, on a 1-device mesh;
  subprocess:  `python -m pan_jax.main` with 1 device resuming a copy of the
               8-device step-3 checkpoint to step 6.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from configs import smoke
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pan_jax import errors
from pan_jax import optim
from pan_jax import sharding
from pan_jax import train
from pan_jax.checkpoints import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  config = smoke.get_config()
  config.total_steps = 6
  config.checkpoint_every_steps = 3
  config.eval_every_steps = 0  # Validation only at the end.
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


class _Recorder:
  """Stands in for sharding.to_global: records batches, injects events."""

  def __init__(self, stop_at=None, nan_at=None):
    self.batches = []
    self._stop_at, self._nan_at = stop_at, nan_at
    self._to_global = sharding.to_global

  def __call__(self, batch, mesh):
    batch = {k: np.array(v) for k, v in batch.items()}
    if len(self.batches) + 1 == self._nan_at:
      batch['image'][0, 0, 0, 0] = np.nan
    self.batches.append(batch)
    if len(self.batches) == self._stop_at:
      # A real signal, handled by the installed handler mid-step.
      os.kill(os.getpid(), signal.SIGTERM)
    return self._to_global(batch, mesh)


def _fake_validate(model, state, config, meta, mesh):
  del model, state, config, mesh
  return {'miou': 0.25, 'pixel_accuracy': 0.5, 'mean_accuracy': 0.4,
          'per_class_iou': np.full(meta.num_classes, 0.25)}


def _run(config, workdir, recorder, mesh=None):
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sharding, 'to_global', recorder)
    patch.setattr(train, 'validate', _fake_validate)
    return train.train_and_evaluate(config, str(workdir), mesh=mesh)


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """Identical programs (8-device runs; 1-device runs) compile once."""
  cache = str(tmp_path_factory.mktemp('jax_cache'))
  names = ('jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs')
  previous = {name: getattr(jax.config, name) for name in names}
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  yield cache
  for name, value in previous.items():
    jax.config.update(name, value)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, compilation_cache):
  """Runs the scenarios of the module docstring once."""
  root = tmp_path_factory.mktemp('runs')
  out = {'root': root}
  straight = _Recorder()
  out['straight'] = _run(_config(), root / 'straight', straight)
  out['straight_batches'] = straight.batches

  first = _Recorder(stop_at=3)
  out['stopped'] = _run(_config(), root / 'interrupted', first)
  out['step3_variables'], _ = workdir_lib.restore_variables(
      str(root / 'interrupted'), step=3)
  shutil.copytree(root / 'interrupted', root / 'to_one_device')
  second = _Recorder()
  out['resumed'] = _run(_config(), root / 'interrupted', second)
  out['resumed_batches'] = first.batches + second.batches

  one = _Recorder(stop_at=3)
  _run(_config(), root / 'one_device', one,
       mesh=sharding.make_mesh(jax.devices()[:1]))

  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_DISABLE_MOST_OPTIMIZATIONS='1',
             JAX_COMPILATION_CACHE_DIR=compilation_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')
  out['subprocess'] = subprocess.run(
      [sys.executable, '-m', 'pan_jax.main', '--config=configs/smoke.py',
       f'--workdir={root / "to_one_device"}', '--config.total_steps=6',
       '--config.checkpoint_every_steps=3', '--config.eval_every_steps=0'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  return out


def _params(workdir, step=None):
  variables, saved_step = workdir_lib.restore_variables(str(workdir), step)
  return variables, saved_step


def test_resume_after_sigterm_is_bit_exact(runs):
  assert runs['stopped']['stopped_by'] == 'SIGTERM'
  assert runs['stopped']['step'] == 3
  assert runs['resumed']['step'] == 6 and runs['resumed']['stopped_by'] is None
  straight, straight_step = _params(runs['root'] / 'straight')
  resumed, resumed_step = _params(runs['root'] / 'interrupted')
  assert straight_step == resumed_step == 6
  assert len(runs['straight_batches']) == len(runs['resumed_batches']) == 6
  for a, b in zip(runs['straight_batches'], runs['resumed_batches']):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(a[key], b[key])
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)


def test_one_device_matches_eight(runs):
  one, step = _params(runs['root'] / 'one_device')
  assert step == 3
  eight = runs['step3_variables']
  # Sums are ordered differently on 1 and 8 devices; BatchNorm over a batch
  # of 8 tiny feature maps amplifies the rounding to ~5e-5 in 3 steps.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3,
                                                       atol=2e-4), one, eight)
  # The comparison is not vacuous: training moved the parameters.
  straight_start = jax.tree.leaves(eight)
  assert any(np.any(x != 0) for x in straight_start)


def test_eight_device_checkpoint_resumes_on_one_device(runs):
  result = runs['subprocess']
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from the checkpoint of step 3' in result.stderr
  assert '1 local / 1 global devices' in result.stderr
  one, step = _params(runs['root'] / 'to_one_device')
  straight, _ = _params(runs['root'] / 'straight')
  assert step == 6
  # 3 steps on 8 devices then 3 on 1 against 6 on 8: rounding differences
  # grow to ~2e-4 (see test_one_device_matches_eight).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3,
                                                       atol=1e-3),
               one, straight)


def test_workdir_contents_and_metrics(runs):
  workdir = runs['root'] / 'straight'
  config = json.loads((workdir / 'config.json').read_text())
  assert config['total_steps'] == 6 and config['model']['base_width'] == 8
  meta = json.loads((workdir / 'dataset.json').read_text())
  assert meta['ignore_label'] == 255 and meta['num_classes'] >= 2
  assert os.listdir(workdir / 'tensorboard')
  records = [json.loads(l) for l in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_records = [r for r in records if 'loss' in r]
  assert [r['step'] for r in train_records] == [1, 2, 3, 4, 5, 6]
  config = _config()
  for r in train_records:
    # The update that completes step s uses lr0 * (1 - (s-1)/total)^0.9.
    expected = 4e-3 * (1 - (r['step'] - 1) / 6) ** 0.9
    np.testing.assert_allclose(r['learning_rate'], expected, rtol=1e-6)
    np.testing.assert_allclose(
        r['learning_rate'], optim.learning_rate(config, r['step'] - 1))
    assert np.isfinite(r['loss']) and np.isfinite(r['grad_norm'])
  assert all('images_per_sec' in r for r in train_records[1:])
  val = [r for r in records if 'val/miou' in r]
  assert [r['step'] for r in val] == [6] and val[0]['val/miou'] == 0.25
  # The resumed run dropped nothing and repeated nothing.
  resumed = [json.loads(l)['step'] for l in (
      runs['root'] / 'interrupted' / 'metrics.jsonl').read_text().splitlines()
             if 'loss' in l]
  assert resumed == [1, 2, 3, 4, 5, 6]
  manager = workdir_lib.create_manager(str(workdir), _config())
  assert manager.all_steps() == [3, 6]
  manager.close()


def test_incompatible_workdir_is_refused(runs):
  config = _config(**{'model.decoder_channels': 8})
  with pytest.raises(errors.MismatchError, match='model.decoder_channels: '
                     'saved 16, now 8'):
    train.train_and_evaluate(config, str(runs['root'] / 'straight'))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = _config()  # As in `runs`, so the compiled step is reused.
  with pytest.raises(errors.DivergedError) as e:
    _run(config, tmp_path, _Recorder(nan_at=4))
  message = str(e.value)
  assert 'Non-finite training values at step 4' in message
  assert 'last good checkpoint is step 3' in message
  variables, step = workdir_lib.restore_variables(str(tmp_path))
  assert step == 3
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


@pytest.mark.parametrize('overrides, message', [
    ({'global_batch_size': 12},
     'config.global_batch_size=12 must be a positive multiple of the number '
     'of devices (8'),
    ({'data.crop_size': 16},
     'config.data.crop_size=16 is too small for this model'),
    ({'log_every_steps': 0}, 'config.log_every_steps must be positive'),
    ({'eval.canvas_size': (64, 64)},
     'config.eval.canvas_size=(64, 64) cannot hold the largest image of '
     'fake/val'),
])
def test_config_guards(tmp_path, overrides, message):
  with pytest.raises(errors.ConfigError) as e:
    train.train_and_evaluate(_config(**overrides), str(tmp_path))
  assert message in str(e.value)
  assert e.value.exit_code == 1  # A user error: one line, status 1.
  assert not os.path.exists(tmp_path / 'checkpoints')  # Failed before.


def test_unknown_override_is_an_error(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'pan_jax.main', '--config=configs/smoke.py',
       f'--workdir={tmp_path}', '--config.optim.learing_rate=0.1'],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert 'Did you mean "learning_rate" instead of "learing_rate"?' in (
      result.stderr)
  assert not os.listdir(tmp_path)  # Failed before writing anything.


def test_a_stop_is_saved_within_two_steps_of_the_signal(tmp_path,
                                                        monkeypatch):
  """At most train.MAX_STEPS_IN_FLIGHT steps are dispatched and unfinished,
  so a SIGTERM sent when the device has finished step f is saved at step
  f + 2 at the latest, although this host prepares steps much faster than
  its (slowed) device runs them: the host does not run ahead."""
  assert train.MAX_STEPS_IN_FLIGHT == 2
  real_step = train.train_step

  def slow_step(state, batch, ignore_label):
    new_state, metrics = real_step(state, batch, ignore_label)
    # Busy work that depends on the step, so the device takes a while.
    x = jnp.full((512, 512), 1e-3, jnp.float32) * new_state.step
    x = jax.lax.fori_loop(0, 150, lambda _, x: jnp.tanh(x @ x + 1e-3), x)
    return new_state, {**metrics, 'busy': jnp.sum(x)}

  monkeypatch.setattr(train, 'train_step', slow_step)
  real_compile = train.compile_train_step
  dispatched = []  # Each step's metrics, as the loop dispatches them.

  def compile_recording(*args):
    step_fn = real_compile(*args)

    def recording_step(state, batch):
      state, metrics = step_fn(state, batch)
      dispatched.append(metrics)
      return state, metrics
    return recording_step

  monkeypatch.setattr(train, 'compile_train_step', compile_recording)
  finished = []

  def send_sigterm_after(step):
    while len(dispatched) < step:
      time.sleep(0.01)
    jax.block_until_ready(dispatched[step - 1])
    finished.append(step)
    os.kill(os.getpid(), signal.SIGTERM)

  watcher = threading.Thread(target=send_sigterm_after, args=(3,),
                             daemon=True)
  watcher.start()
  config = _config(total_steps=40, checkpoint_every_steps=100,
                   log_every_steps=100)
  device = jax.devices()[0]
  result = _run(config, tmp_path / 'run', _Recorder(),
                mesh=sharding.make_mesh([device]))
  watcher.join(timeout=60)
  assert finished == [3] and result['stopped_by'] == 'SIGTERM'
  # Unbounded, this loop was measured to save at step 25 here.
  assert 3 <= result['step'] <= 5, len(dispatched)
  assert len(dispatched) == result['step']  # Nothing dispatched beyond it.
  assert _params(tmp_path / 'run')[1] == result['step']


def test_is_time():
  assert [s for s in range(1, 8) if train.is_time(s, 3, 7)] == [3, 6, 7]
  assert [s for s in range(1, 8) if train.is_time(s, 0, 7)] == [7]


def test_init_from_replaces_initial_variables(monkeypatch):
  mesh = sharding.make_mesh()
  params = {'backbone': {'conv': {'kernel': np.zeros((3, 3, 3, 4),
                                                     np.float32)}},
            'head': {'bias': np.zeros((4,), np.float32)}}
  state = train.TrainState.create(
      apply_fn=None, params=params, tx=optim.create_optimizer(_config()),
      batch_stats={'backbone': {'bn': {'mean': np.zeros((4,), np.float32)}}})
  state = jax.device_put(state, sharding.replicated(mesh))

  def fake_load(variables, path, config):
    assert path == '/weights' and config.model.init_from == '/weights'
    variables = jax.tree.map(np.asarray, variables)
    variables['params']['backbone']['conv']['kernel'] = np.ones(
        (3, 3, 3, 4), np.float32)
    return variables, 'Loaded the backbone from /weights.'

  monkeypatch.setattr(train.pretrained, 'load_pretrained', fake_load)
  loaded = train._load_pretrained(  # pylint: disable=protected-access
      state, _config(**{'model.init_from': '/weights'}), mesh)
  kernel = loaded.params['backbone']['conv']['kernel']
  assert kernel.sharding == sharding.replicated(mesh)
  np.testing.assert_array_equal(kernel, 1.0)
  np.testing.assert_array_equal(loaded.params['head']['bias'], 0.0)


def test_missing_init_from_fails_before_compiling(tmp_path):
  config = _config(**{'model.init_from': str(tmp_path / 'nothing')})
  with pytest.raises((FileNotFoundError, ValueError), match='nothing'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def _events(directory):
  """The Events of a TensorBoard event directory (TFRecord framing)."""
  # pylint: disable=g-import-not-at-top
  import struct
  from tensorboardX.proto import event_pb2
  # pylint: enable=g-import-not-at-top
  events = []
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4  # length, its crc, data, data crc.
      events.append(event_pb2.Event.FromString(record))
  return events


def test_tensorboard_per_class_iou_overlays_and_profile(tmp_path):
  """Each validation writes one IoU scalar per class name and overlay
  images; config.profile_steps traces those steps into WORKDIR/profile."""
  names = []

  def validate(model, state, config, meta, mesh):
    del model, state, mesh
    names[:] = meta.class_names
    rng = np.random.default_rng(0)
    per_class = np.linspace(0.1, 0.9, meta.num_classes)
    per_class[-1] = np.nan  # Absent class: no scalar.
    samples = [{'image': rng.normal(size=(12, 10, 3)), 'index': i,
                'label': rng.integers(0, meta.num_classes, (12, 10)),
                'prediction': rng.integers(0, meta.num_classes, (12, 10))}
               for i in range(config.eval.num_overlays)]
    return {'miou': 0.5, 'pixel_accuracy': 0.5, 'mean_accuracy': 0.5,
            'per_class_iou': per_class, 'samples': samples}

  config = _config(eval_every_steps=3, profile_steps=(2, 3))
  config.eval.num_overlays = 2
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train, 'validate', validate)
    train.train_and_evaluate(config, str(tmp_path))
  events = _events(tmp_path / 'tensorboard')
  scalars = {(v.tag, e.step): v.simple_value for e in events
             for v in e.summary.value if v.HasField('simple_value')}
  images = {(v.tag, e.step): v.image for e in events
            for v in e.summary.value if v.HasField('image')}
  expected = np.linspace(0.1, 0.9, len(names))
  for step in (3, 6):
    for k, name in enumerate(names[:-1]):
      assert scalars[(f'val/per_class_iou/{name}', step)] == pytest.approx(
          expected[k])
    assert (f'val/per_class_iou/{names[-1]}', step) not in scalars
    assert scalars[('val/miou', step)] == 0.5
    for i in range(2):
      image = images[(f'val/overlay/{i}', step)]
      # image | ground truth | prediction, under captions, over a legend.
      assert image.width == 3 * 10 + 2 * 4 and image.height > 12 + 16
  assert ('train/loss', 1) in scalars
  # The trace of steps 2-3: TensorBoard's profile plugin layout.
  traces = [os.path.join(root, f) for root, _, files in
            os.walk(tmp_path / 'profile') for f in files]
  assert any(t.endswith('.xplane.pb') for t in traces), traces


def test_profile_steps_are_checked(tmp_path):
  for value in ((3,), (0, 2), (5, 4)):
    with pytest.raises(errors.ConfigError) as e:
      train.train_and_evaluate(_config(profile_steps=value), str(tmp_path))
    assert 'config.profile_steps' in str(e.value)


def test_profile_of_a_gcs_workdir_is_copied_into_it(gcs_bucket):
  # pylint: disable=g-import-not-at-top
  from pan_jax import paths
  # pylint: enable=g-import-not-at-top
  workdir = f'{gcs_bucket}/run'
  config = _config(profile_steps=(1, 1))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train, 'validate', _fake_validate)
    train.train_and_evaluate(config, workdir)
  found, stack = [], [f'{workdir}/profile']
  while stack:
    folder = stack.pop()
    for name in paths.listdir(folder):
      path = f'{folder}/{name}'
      (stack if paths.isdir(path) else found).append(path)
  assert any(p.endswith('.xplane.pb') for p in found), found
  assert paths.listdir(f'{workdir}/tensorboard')
