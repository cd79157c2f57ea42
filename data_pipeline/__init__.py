"""Input side of ove_jax: codec patch selection, precompute, and the Grain pipeline.

Never imports `ove_jax` (or JAX): codec analysis and input workers stay free of the model.
"""
