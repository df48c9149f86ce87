"""Examples: tdu_jax with your own models (Linen, NNX, plain functions)."""
