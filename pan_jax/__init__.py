"""pan_jax: Pyramid Attention Network for semantic segmentation in JAX/Flax.

The one-call API is `pan_jax.load`; everything else lives in the submodules
(`pan_jax.models`, `pan_jax.checkpoints`, ...). Importing pan_jax alone
imports neither jax nor flax.
"""

from typing import Any, Mapping, Optional, Sequence

__version__ = '0.1.0'


def load(path_or_url: str, *, step: Optional[int] = None,
         scales: Optional[Sequence[float]] = None,
         flip: Optional[bool] = None, mode: Optional[str] = None,
         batch_size: int = 8,
         config_overrides: Optional[Mapping[str, Any]] = None) -> Any:
  """A predictor for a checkpoint: uint8 RGB images in, class-id masks out.

  With `path` a checkpoint and `image` a uint8 RGB array [120, 160, 3]
  (tests/test_api.py runs these lines):

  >>> predictor = pan_jax.load(path)
  >>> mask = predictor(image)
  >>> mask.shape, mask.dtype
  ((120, 160), dtype('uint8'))
  >>> [m.shape for m in predictor([image, image[:50, :70]])]
  [(120, 160), (50, 70)]
  >>> probs = predictor.probabilities(image)
  >>> probs.shape == mask.shape + (len(predictor.class_names),)
  True
  >>> bool((probs.argmax(-1) == mask).all())
  True

  Args:
    path_or_url: a training workdir, an inference checkpoint
      (`python -m pan_jax.export`) or a converted network
      (`python -m pan_jax.convert --format=smp`); passed on to
      `pan_jax.checkpoints.load`.
    step: checkpoint step of a workdir (None = the latest).
    scales: test-time scales, e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
      (None = the checkpoint's config.eval.scales).
    flip: also average the mirrored image (None = config.eval.flip).
    mode: 'whole' or 'slide' (None = config.eval.mode).
    batch_size: most images per compiled call.
    config_overrides: {dotted path: value} applied to the saved config,
      e.g. {'eval.canvas_size': (640, 640)}.

  Returns:
    A `pan_jax.predict.Predictor`.
  """
  from pan_jax import predict  # pylint: disable=g-import-not-at-top
  return predict.load(path_or_url, step=step, scales=scales, flip=flip,
                      mode=mode, batch_size=batch_size,
                      config_overrides=config_overrides)
