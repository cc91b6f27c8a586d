"""Tests for pan_jax.checkpointing: save/restore, variables, config checks."""

import json
import os
import signal
from typing import Any

from flax.training import train_state
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pan_jax import sharding
from pan_jax.checkpoints import workdir as workdir_lib


class _State(train_state.TrainState):
  batch_stats: Any


def _config(every=2, keep=2):
  config = ml_collections.ConfigDict()
  config.checkpoint_every_steps = every
  config.max_checkpoints_to_keep = keep
  config.model = {'backbone': 'resnet18', 'init_from': ''}
  config.data = {'name': 'fake', 'train_split': 'train', 'crop_size': 64,
                 'min_scale': 0.5, 'max_scale': 2.0, 'data_dir': 'data'}
  config.total_steps = 10
  return config


def _state(mesh, value=1.0):
  params = {'conv': {'kernel': jnp.full((3, 3, 2, 4), value),
                     'bias': jnp.zeros(4)}}
  state = _State.create(apply_fn=None, params=params, tx=optax.sgd(0.1, 0.9),
                        batch_stats={'bn': {'mean': jnp.arange(4.0)}})
  return jax.device_put(state, sharding.replicated(mesh))


def _data_iter():
  return (grain.MapDataset.range(100).shuffle(seed=0).batch(4)
          .to_iter_dataset().__iter__())


def test_save_restore_state_and_iterator(tmp_path):
  mesh = sharding.make_mesh()
  manager = workdir_lib.create_manager(str(tmp_path), _config())
  state, data_iter = _state(mesh, 2.0), _data_iter()
  seen = [next(data_iter) for _ in range(3)]
  assert workdir_lib.save(manager, 3, state, data_iter, force=True)
  expected_next = next(data_iter)
  manager.wait_until_finished()
  manager.close()

  manager = workdir_lib.create_manager(str(tmp_path), _config())
  assert manager.latest_step() == 3
  abstract = jax.eval_shape(lambda: _state(mesh, 0.0))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=sharding.replicated(mesh)),
      abstract)
  restored = workdir_lib.restore_state(manager, 3, abstract)
  np.testing.assert_array_equal(restored.params['conv']['kernel'], 2.0)
  assert int(restored.step) == 0
  fresh = _data_iter()
  assert workdir_lib.restore_data_iter(manager, 3, fresh)
  np.testing.assert_array_equal(next(fresh), expected_next)
  assert not any(np.array_equal(expected_next, s) for s in seen)
  manager.close()


def test_keeps_newest_and_restore_variables(tmp_path):
  mesh = sharding.make_mesh()
  manager = workdir_lib.create_manager(str(tmp_path), _config(every=1))
  data_iter = _data_iter()
  for step in (1, 2, 3):
    workdir_lib.save(manager, step, _state(mesh, float(step)), data_iter)
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]
  manager.close()
  variables, step = workdir_lib.restore_variables(str(tmp_path))
  assert step == 3 and set(variables) == {'params', 'batch_stats'}
  kernel = variables['params']['conv']['kernel']
  assert isinstance(kernel, np.ndarray) and np.all(kernel == 3.0)
  variables, step = workdir_lib.restore_variables(str(tmp_path), step=2)
  assert np.all(variables['params']['conv']['kernel'] == 2.0)
  with pytest.raises(FileNotFoundError, match='saved steps: \\[2, 3\\]'):
    workdir_lib.restore_variables(str(tmp_path), step=1)
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    workdir_lib.restore_variables(str(tmp_path / 'missing'))


def test_relative_workdir(tmp_path, monkeypatch):
  """A workdir relative to the current directory, as launch/demo.sh passes."""
  monkeypatch.chdir(tmp_path)
  mesh = sharding.make_mesh()
  manager = workdir_lib.create_manager(os.path.join('runs', 'demo'),
                                         _config())
  assert workdir_lib.save(manager, 1, _state(mesh, 5.0), _data_iter(),
                            force=True)
  manager.wait_until_finished()
  manager.close()
  assert os.path.isdir(tmp_path / 'runs' / 'demo' / 'checkpoints' / '1')
  variables, step = workdir_lib.restore_variables(os.path.join('runs',
                                                                 'demo'))
  assert step == 1
  assert np.all(variables['params']['conv']['kernel'] == 5.0)


def test_iterator_of_other_process_count_is_rebuilt(tmp_path):
  mesh = sharding.make_mesh()
  manager = workdir_lib.create_manager(str(tmp_path), _config())
  workdir_lib.save(manager, 2, _state(mesh), _data_iter(), force=True)
  manager.wait_until_finished()
  # What a checkpoint written by 2 processes looks like to 1 process.
  item = tmp_path / 'checkpoints' / '2' / 'data_iter'
  os.rename(item / 'process_0-of-1.json', item / 'process_0-of-2.json')
  assert not workdir_lib.restore_data_iter(manager, 2, _data_iter())
  manager.close()


def test_check_compatible(tmp_path):
  config = _config()
  workdir_lib.check_compatible(str(tmp_path), config)  # Nothing saved yet.
  workdir_lib.save_run_info(str(tmp_path), config, {'num_classes': 3})
  assert json.loads((tmp_path / 'dataset.json').read_text()) == {
      'num_classes': 3}
  (tmp_path / 'checkpoints' / '4').mkdir(parents=True)
  changed = _config()
  changed.total_steps = 20  # Allowed: extends training.
  changed.model.init_from = 'x'  # Allowed: only used by a fresh start.
  changed.data.data_dir = 'elsewhere'
  workdir_lib.check_compatible(str(tmp_path), changed)
  changed.model.backbone = 'resnet50'
  changed.data.crop_size = 32
  with pytest.raises(ValueError) as e:
    workdir_lib.check_compatible(str(tmp_path), changed)
  assert "model.backbone: saved 'resnet18', now 'resnet50'" in str(e.value)
  assert 'data.crop_size: saved 64, now 32' in str(e.value)
  assert 'new --workdir' in str(e.value)
  os.remove(tmp_path / 'config.json')
  with pytest.raises(ValueError, match='config.json cannot be read'):
    workdir_lib.check_compatible(str(tmp_path), config)


class _Preemption:
  """Stands in for a CheckpointManager's reached_preemption."""

  def __init__(self, at=None):
    self._at = at

  def reached_preemption(self, step):
    return step == self._at


def test_stop_requests_of_one_process():
  stop = workdir_lib.StopRequest()
  try:
    assert not stop.should_stop(1, _Preemption())
    signal.raise_signal(signal.SIGTERM)
    assert stop.should_stop(2, _Preemption()) and stop.signal_name == 'SIGTERM'
  finally:
    stop.close()


def test_several_processes_stop_where_they_agree(monkeypatch):
  """No per-step round trip: SIGTERM is JAX's (its preemption notifier tells
  the coordinator), SIGINT is passed on as a SIGTERM of this process, and
  the stop happens at the step the processes agreed on."""
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  sent = []
  monkeypatch.setattr(os, 'kill', lambda pid, sig: sent.append((pid, sig)))
  previous = signal.getsignal(signal.SIGTERM)
  stop = workdir_lib.StopRequest()
  try:
    assert signal.getsignal(signal.SIGTERM) is previous  # Left to JAX.
    signal.raise_signal(signal.SIGINT)
    assert sent == [(os.getpid(), signal.SIGTERM)]
    agreed = _Preemption(at=7)
    # Not before the agreed step, even though this process got the signal.
    assert not stop.should_stop(6, agreed)
    assert stop.should_stop(7, agreed) and stop.signal_name == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):  # A second Ctrl-C: at once.
      signal.raise_signal(signal.SIGINT)
  finally:
    stop.close()
  # A process that got no signal learns it from the agreement.
  other = workdir_lib.StopRequest()
  try:
    assert other.should_stop(3, _Preemption(at=3))
    assert other.signal_name == 'a SIGTERM (preemption notice)'
  finally:
    other.close()
