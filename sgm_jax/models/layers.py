"""Layers shared by the score networks (DDPM / NCSN++ families)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def default_init(scale: float = 1.0):
  """DDPM's initializer: variance scaling, fan_avg, uniform (scale 0 becomes 1e-10)."""
  return jax.nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int,
                           max_positions: int = 10000) -> jax.Array:
  """Sinusoidal embedding of (B,) time labels as in DDPM/Transformer: (B, embedding_dim)."""
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must be a (B,) array, got shape {timesteps.shape}")
  half_dim = embedding_dim // 2
  scale = math.log(max_positions) / (half_dim - 1)
  freqs = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -scale)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, [[0, 0], [0, 1]])
  return emb
