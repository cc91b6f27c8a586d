"""Tests for pan_jax.optim: the poly schedule and torch-style SGD."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pan_jax import optim


def _config(total=100, lr=0.01, power=0.9, warmup=0, wd=1e-4, momentum=0.9,
            decay_norm_and_bias=True):
  config = ml_collections.ConfigDict()
  config.total_steps = total
  config.optim = dict(learning_rate=lr, poly_power=power, warmup_steps=warmup,
                      weight_decay=wd, momentum=momentum,
                      decay_norm_and_bias=decay_norm_and_bias)
  return config


@pytest.mark.parametrize('step', [0, 1, 37, 50, 99, 100, 150])
def test_poly_formula(step):
  config = _config()
  expected = 0.01 * max(0.0, 1 - step / 100) ** 0.9
  np.testing.assert_allclose(optim.learning_rate(config, step), expected,
                             rtol=1e-6, atol=1e-12)


def test_warmup_multiplies_poly():
  config = _config(warmup=10)
  for step in (0, 5, 10, 60):
    expected = 0.01 * min(1.0, step / 10) * (1 - step / 100) ** 0.9
    np.testing.assert_allclose(optim.learning_rate(config, step), expected,
                               rtol=1e-6)


def test_bad_warmup_is_an_error():
  with pytest.raises(ValueError, match='warmup_steps=100'):
    optim.create_optimizer(_config(warmup=100))


def test_decay_mask():
  params = {'conv': {'kernel': 1, 'bias': 2}, 'bn': {'scale': 3, 'bias': 4}}
  assert optim.decay_mask(params, False) == {
      'conv': {'kernel': True, 'bias': False},
      'bn': {'scale': False, 'bias': False}}
  assert all(jax.tree.leaves(optim.decay_mask(params, True)))


@pytest.mark.parametrize('decay_norm_and_bias', [True, False])
def test_matches_torch_sgd_update(decay_norm_and_bias):
  """Three updates equal torch.optim.SGD(momentum, weight_decay) + poly."""
  config = _config(total=10, lr=0.1, wd=0.01,
                   decay_norm_and_bias=decay_norm_and_bias)
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(3, 2)).astype(np.float32),
            'bias': rng.normal(size=(2,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32)
            for k, v in params.items()} for _ in range(3)]
  tx = optim.create_optimizer(config)
  state = tx.init(jax.tree.map(jnp.asarray, params))
  current = jax.tree.map(jnp.asarray, params)
  reference = {k: v.astype(np.float64) for k, v in params.items()}
  buffers = {k: np.zeros_like(v) for k, v in reference.items()}
  for step, grad in enumerate(grads):
    updates, state = tx.update(jax.tree.map(jnp.asarray, grad), state,
                               current)
    current = jax.tree.map(lambda p, u: p + u, current, updates)
    lr = 0.1 * (1 - step / 10) ** 0.9
    for k in reference:
      wd = 0.01 if (decay_norm_and_bias or k == 'kernel') else 0.0
      g = grad[k] + wd * reference[k]
      buffers[k] = 0.9 * buffers[k] + g if step else g
      reference[k] = reference[k] - lr * buffers[k]
  for k in reference:
    np.testing.assert_allclose(current[k], reference[k], rtol=1e-5,
                               atol=1e-6)
