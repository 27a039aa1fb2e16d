"""Layers shared by the score networks (DDPM / NCSN++ families).

Initializers, activations, 1x1/3x3 convolutions and the NIN (per-pixel dense) layer follow the
conventions of DDPM (Ho et al., 2020) as used by score_sde (Song et al., ICLR 2021), so that
parameter names and shapes agree with the released checkpoints.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.errors import InputError

Array = jax.Array
Activation = Callable[[Array], Array]


def default_init(scale: float = 1.0):
  """DDPM's initializer: variance scaling, fan_avg, uniform (scale 0 becomes 1e-10)."""
  return jax.nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int,
                           max_positions: int = 10000) -> jax.Array:
  """Sinusoidal embedding of (B,) time labels as in DDPM/Transformer: (B, embedding_dim)."""
  if timesteps.ndim != 1:
    raise InputError(f"timesteps must be a (B,) array, got shape {timesteps.shape}")
  half_dim = embedding_dim // 2
  scale = math.log(max_positions) / (half_dim - 1)
  freqs = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -scale)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, [[0, 0], [0, 1]])
  return emb


_ACTIVATIONS: dict[str, Activation] = {
    "swish": nn.swish,
    "elu": nn.elu,
    "relu": nn.relu,
    "lrelu": functools.partial(nn.leaky_relu, negative_slope=0.2),
}


def get_act(name: str) -> Activation:
  """Nonlinearity by its score_sde config name: swish | elu | relu | lrelu (slope 0.2)."""
  try:
    return _ACTIVATIONS[name.lower()]
  except KeyError:
    raise InputError(
        f"unknown nonlinearity {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


def conv1x1(x: Array, out_ch: int, stride: int = 1, bias: bool = True,
            init_scale: float = 1.0) -> Array:
  """1x1 convolution with DDPM initialization (creates an `nn.Conv` in the calling module)."""
  return nn.Conv(out_ch, kernel_size=(1, 1), strides=(stride, stride), padding="SAME",
                 use_bias=bias, kernel_init=default_init(init_scale),
                 bias_init=jax.nn.initializers.zeros)(x)


def conv3x3(x: Array, out_ch: int, stride: int = 1, bias: bool = True,
            init_scale: float = 1.0) -> Array:
  """3x3 'SAME' convolution with DDPM initialization (creates an `nn.Conv` in the caller)."""
  return nn.Conv(out_ch, kernel_size=(3, 3), strides=(stride, stride), padding="SAME",
                 use_bias=bias, kernel_init=default_init(init_scale),
                 bias_init=jax.nn.initializers.zeros)(x)


class NIN(nn.Module):
  """Network-in-network: a dense layer over the channel axis at every pixel (params W, b)."""
  num_units: int
  init_scale: float = 0.1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param("W", default_init(self.init_scale), (x.shape[-1], self.num_units))
    b = self.param("b", jax.nn.initializers.zeros, (self.num_units,))
    y = jnp.tensordot(x, w, axes=1)
    return y + b.reshape((1,) * (y.ndim - 1) + (-1,))
