"""sgm-jax: score-based generative modeling with SDEs in JAX/Flax."""
__version__ = "0.1.0"
