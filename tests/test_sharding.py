"""Tests for pan_jax.sharding."""

import jax
import numpy as np
import pytest

from pan_jax import sharding


def test_mesh_and_to_global():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.devices.size == 8
  batch = {'image': np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(
      8, 2, 2, 3), 'label': np.zeros((8, 2, 2), np.int32)}
  out = sharding.to_global(batch, mesh)
  assert out['image'].shape == (8, 2, 2, 3)
  assert out['image'].sharding == sharding.batch_sharding(mesh)
  assert len(out['image'].addressable_shards) == 8
  np.testing.assert_array_equal(out['image'], batch['image'])


def test_sub_mesh():
  mesh = sharding.make_mesh(jax.devices()[:1])
  assert mesh.devices.size == 1


def test_batch_size_guard():
  mesh = sharding.make_mesh()
  sharding.check_batch_size(16, mesh)
  with pytest.raises(ValueError) as e:
    sharding.check_batch_size(12, mesh)
  assert 'config.global_batch_size=12' in str(e.value)
  assert 'multiple of the number of devices (8' in str(e.value)
  assert '--config.global_batch_size=8' in str(e.value)
