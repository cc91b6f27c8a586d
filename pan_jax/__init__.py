"""pan_jax: Pyramid Attention Network for semantic segmentation in JAX/Flax."""

__version__ = '0.1.0'
