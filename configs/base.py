"""Base configuration: every field pan_jax reads, each with its default.

The fields, their defaults and what each means are defined once, in the
library (pan_jax/defaults.py), because commands parse `--config.x=y`
overrides against them. The other files in configs/ call `get_config()` here
and override fields.
"""

import ml_collections

from pan_jax import defaults


def get_config() -> ml_collections.ConfigDict:
  """Returns the base configuration (the paper's PAN on VOC, ResNet-101)."""
  return defaults.get_config()
