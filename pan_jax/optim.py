"""Optimiser: SGD with momentum, L2 weight decay and the poly schedule.

The paper (section 4) trains with SGD, momentum 0.9, weight decay 1e-4 and the
"poly" learning rate lr0 * (1 - step / total_steps)^0.9. This module builds the
same update as `torch.optim.SGD(momentum=0.9, weight_decay=wd)` under that
schedule (config.optim.optimizer = 'sgd', the default):

  g <- g + wd * p            (L2 added to the gradient, not decoupled)
  buf <- momentum * buf + g  (no dampening, no Nesterov)
  p <- p - lr(step) * buf

where `step` counts the updates already applied (the first update uses
lr(0) = lr0). An optional linear warm-up multiplies the poly value by
min(1, step / warmup_steps), so the curve is continuous at the end of the
warm-up and still reaches zero at `total_steps`.

config.optim.optimizer = 'adamw' swaps SGD for AdamW (decoupled weight decay,
b1 = optim.momentum, b2 = 0.999) under the same schedule and decay mask. It is
not the paper's recipe: it is for training from scratch in a few hundred steps
(configs/demo.py), where SGD without ImageNet weights learns far slower.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from pan_jax import errors

# Leaf names that hold BatchNorm scales/biases and conv biases in flax modules.
_NORM_AND_BIAS_NAMES = ('bias', 'scale')


def learning_rate(config: ml_collections.ConfigDict, step):
  """The learning rate for the update applied at `step`.

  Args:
    config: the whole configuration (reads total_steps and optim.*).
    step: number of updates already applied; a Python int, NumPy or jax scalar.

  Returns:
    lr0 * min(1, step / warmup_steps) * (1 - step / total_steps)^poly_power,
    float32; zero at and after total_steps.
  """
  optim = config.optim
  step = jnp.asarray(step, jnp.float32)
  remaining = jnp.clip(1.0 - step / float(config.total_steps), 0.0, 1.0)
  lr = optim.learning_rate * remaining ** optim.poly_power
  if optim.warmup_steps > 0:
    lr = lr * jnp.minimum(1.0, step / float(optim.warmup_steps))
  return lr


def create_learning_rate_fn(
    config: ml_collections.ConfigDict) -> Callable[[Any], jax.Array]:
  """Returns `step -> learning rate` (an optax schedule) for `config`."""
  return lambda step: learning_rate(config, step)


def decay_mask(params: Any, decay_norm_and_bias: bool) -> Any:
  """Which parameters receive weight decay.

  Args:
    params: the model's parameter tree.
    decay_norm_and_bias: if True every parameter is decayed (plain
      torch.optim.SGD, mmseg's default); if False leaves named 'bias' or
      'scale' (BatchNorm scales/biases and conv biases) are not.

  Returns:
    A tree of bools with the structure of `params`.
  """
  def decayed(path, _):
    name = getattr(path[-1], 'key', None) if path else None
    return decay_norm_and_bias or name not in _NORM_AND_BIAS_NAMES
  return jax.tree_util.tree_map_with_path(decayed, params)


def _sgd(config, learning_rate_fn, mask):
  optim = config.optim
  return optax.chain(
      optax.add_decayed_weights(optim.weight_decay, mask=mask),
      optax.sgd(learning_rate_fn, momentum=optim.momentum, nesterov=False))


def _adamw(config, learning_rate_fn, mask):
  optim = config.optim
  return optax.adamw(learning_rate_fn, b1=optim.momentum, b2=0.999,
                     weight_decay=optim.weight_decay, mask=mask)


# config.optim.optimizer -> builder(config, learning_rate_fn, decay mask fn).
OPTIMIZERS = {'sgd': _sgd, 'adamw': _adamw}


def create_optimizer(
    config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimiser of config.optim under the poly schedule.

  Args:
    config: the whole configuration (reads total_steps and optim.*).

  Returns:
    An optax GradientTransformation: torch-style SGD + momentum + L2 weight
    decay ('sgd'), or AdamW ('adamw').

  Raises:
    ValueError: an unknown optimizer or a warm-up not shorter than training.
  """
  optim = config.optim
  if optim.optimizer not in OPTIMIZERS:
    raise errors.ConfigError(
        f'config.optim.optimizer={optim.optimizer!r} is unknown; valid: '
        f'{", ".join(OPTIMIZERS)}.')
  if config.total_steps <= 0:
    raise errors.ConfigError(
        f'config.total_steps must be positive, got {config.total_steps}.')
  if optim.warmup_steps < 0 or optim.warmup_steps >= config.total_steps:
    raise errors.ConfigError(
        f'config.optim.warmup_steps={optim.warmup_steps} must be in '
        f'[0, total_steps={config.total_steps}).')
  mask = lambda params: decay_mask(params, optim.decay_norm_and_bias)
  return OPTIMIZERS[optim.optimizer](config, create_learning_rate_fn(config),
                                     mask)
