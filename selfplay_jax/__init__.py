"""selfplay_jax: JAX-native self-improvement post-training for decoder LMs."""

__version__ = "0.1.0"
