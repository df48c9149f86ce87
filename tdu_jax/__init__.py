"""tdu_jax: machine unlearning by time-inspired decay, in JAX/Flax."""

__version__ = "0.1.0"
