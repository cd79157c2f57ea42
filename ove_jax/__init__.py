"""ove_jax: OneVision-Encoder pretraining in JAX/Flax."""

__version__ = '0.1.0'
