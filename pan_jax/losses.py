"""Pixel-wise cross-entropy that ignores unlabelled pixels (label 255)."""

import jax
import jax.numpy as jnp
import optax

from pan_jax.data import records


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  ignore_label: int = records.IGNORE_LABEL) -> jax.Array:
  """Softmax cross-entropy averaged over the labelled pixels of the batch.

  The mean is over every valid pixel of the whole (global) batch, not a mean
  of per-image means, so the loss does not depend on how the batch is split
  over devices. Computed in float32 whatever the compute dtype.

  Args:
    logits: [B, H, W, K] scores (any float dtype).
    labels: [B, H, W] int class ids in [0, K), or `ignore_label`.
    ignore_label: label of pixels that do not count.

  Returns:
    float32 scalar; 0 if no pixel is labelled (instead of 0/0 = NaN).
  """
  logits = logits.astype(jnp.float32)
  valid = labels != ignore_label  # [B, H, W]
  # Any in-range id works for ignored pixels: their loss is masked out below.
  safe_labels = jnp.where(valid, labels, 0)
  per_pixel = optax.softmax_cross_entropy_with_integer_labels(
      logits, safe_labels)  # [B, H, W]
  total = jnp.sum(jnp.where(valid, per_pixel, 0.0))
  count = jnp.sum(valid, dtype=jnp.float32)
  return total / jnp.maximum(count, 1.0)
