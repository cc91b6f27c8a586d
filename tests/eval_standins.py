"""Tiny stand-in models for the evaluation tests (not the real PAN).

They take the real model's call signature, `(images, train, image_sizes)`,
and mask padding the way the contract requires, so the inference plumbing can
be tested exactly and fast.
"""

import flax.linen as nn
import jax.numpy as jnp

from pan_jax.models import layers


def valid_mask(images, image_sizes):
  """float32 [B, H, W, 1]: 1 on each image's valid top-left region."""
  if image_sizes is None:
    return jnp.ones(images.shape[:3] + (1,), jnp.float32)
  return layers.valid_mask(image_sizes, images.shape[1],
                           images.shape[2]).astype(jnp.float32)


class ConvPool(nn.Module):
  """3x3 convs + a global average pool, padding-invariant through masking.

  Zeroing everything outside the valid region before each SAME conv makes the
  canvas look exactly like the zero padding of the image at its own size.
  """
  num_classes: int = 5
  width: int = 8

  @nn.compact
  def __call__(self, images, train=False, image_sizes=None):
    del train
    mask = valid_mask(images, image_sizes)
    x = nn.relu(nn.Conv(self.width, (3, 3))(images * mask)) * mask
    pooled = jnp.sum(x, axis=(1, 2), keepdims=True) / jnp.sum(
        mask, axis=(1, 2), keepdims=True)  # [B, 1, 1, width]
    x = (x + nn.Dense(self.width)(pooled)) * mask
    return nn.Conv(self.num_classes, (3, 3))(x)


class Pointwise(nn.Module):
  """Per-pixel 1x1 layers: its prediction at a pixel depends on that pixel only.

  So it is flip-equivariant and sliding windows cannot change its output.
  """
  num_classes: int = 5
  width: int = 8

  @nn.compact
  def __call__(self, images, train=False, image_sizes=None):
    del train, image_sizes
    x = nn.relu(nn.Dense(self.width)(images))
    return nn.Dense(self.num_classes)(x)


_SMOKE_WORKDIR = []


def smoke_workdir(step=4):
  """A training workdir of configs/smoke.py as training writes it (cached).

  config.json, dataset.json and checkpoints/<step> holding a TrainState
  (params, batch statistics with non-trivial values, optimiser state) and a
  data iterator, made without running the training loop. One per test
  process; removed at exit.

  Returns:
    (workdir, config, meta, model, variables).
  """
  # pylint: disable=g-import-not-at-top
  import atexit
  import shutil
  import tempfile

  import grain
  import jax
  import optax
  from configs import smoke
  from pan_jax.checkpoints import workdir as workdir_lib
  from pan_jax import models
  from pan_jax import sharding
  from pan_jax import train
  from pan_jax.data import sources
  # pylint: enable=g-import-not-at-top
  if _SMOKE_WORKDIR:
    return _SMOKE_WORKDIR[0]
  config = smoke.get_config()
  meta = sources.get_meta(config.data)
  model = models.create_model(config, meta.num_classes)
  state = jax.jit(lambda rng: train.create_train_state(
      rng, config, model, optax.sgd(0.1, 0.9)))(jax.random.key(0))
  # Running statistics away from (0, 1), so BatchNorm's shift matters.
  stats_rng = iter(jax.random.split(jax.random.key(1), 1000))
  state = state.replace(batch_stats=jax.tree.map(
      lambda x: x * jax.random.uniform(next(stats_rng), x.shape, x.dtype,
                                       0.5, 1.5) + 0.1, state.batch_stats))
  state = jax.device_put(state, sharding.replicated(sharding.make_mesh()))
  workdir = tempfile.mkdtemp(prefix='pan_jax_eval_test_')
  atexit.register(shutil.rmtree, workdir, ignore_errors=True)
  manager = workdir_lib.create_manager(workdir, config)
  data_iter = iter(grain.MapDataset.range(8).batch(2).to_iter_dataset())
  workdir_lib.save(manager, step, state, data_iter, force=True)
  manager.wait_until_finished()
  manager.close()
  workdir_lib.save_run_info(workdir, config, meta)
  variables = jax.device_get({'params': state.params,
                              'batch_stats': state.batch_stats})
  _SMOKE_WORKDIR.append((workdir, config, meta, model, variables))
  return _SMOKE_WORKDIR[0]
