"""Tests for pan_jax.losses.cross_entropy."""

import jax.numpy as jnp
import numpy as np

from pan_jax import losses


def test_matches_numpy_and_ignores_255():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 5, 6)).astype(np.int32)
  labels[0, :2] = 255
  labels[1, 3, 4] = 255
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  valid = labels != 255
  picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None],
                              -1)[..., 0]
  expected = -picked[valid].mean()  # Mean over the valid pixels of the batch.
  loss = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_all_ignored_is_zero_not_nan():
  logits = jnp.zeros((1, 3, 3, 2))
  labels = jnp.full((1, 3, 3), 255, jnp.int32)
  assert float(losses.cross_entropy(logits, labels)) == 0.0


def test_bfloat16_logits_give_float32_loss():
  logits = jnp.ones((1, 2, 2, 3), jnp.bfloat16)
  labels = jnp.zeros((1, 2, 2), jnp.int32)
  loss = losses.cross_entropy(logits, labels)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, np.log(3.0), rtol=1e-6)
