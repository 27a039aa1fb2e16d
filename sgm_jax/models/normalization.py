"""Normalization layers of the NCSN family (Song & Ermon, NeurIPS 2019 and 2020).

NCSNv2 normalizes with InstanceNorm++ (Song & Ermon 2019, Appendix A): instance normalization
that keeps the information in the per-channel means by adding back their normalized values.
Parameters are stored with shape (1, 1, 1, C), as score_sde does (so checkpoints load unchanged).

The noise-conditional variants of NCSNv1 (ConditionalInstanceNorm2dPlus) are not provided: the
original code cannot build NCSNv1 (see `sgm_jax.models.ncsnv2`).

Like flax's GroupNorm, these compute their statistics and the normalization in float32 whatever
the network's `dtype`, and return `dtype`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.errors import InputError

_EPS = 1e-5


def _near_one(stddev: float = 0.02):
  """N(1, stddev^2) initializer of NCSN's norm scales."""
  def init(key, shape, dtype=jnp.float32):
    return 1.0 + stddev * jax.random.normal(key, shape, dtype)
  return init


def _instance_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-image, per-channel mean and variance over the spatial axes, shapes (B, 1, 1, C)."""
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
  return mean, var


class InstanceNorm2dPlus(nn.Module):
  """InstanceNorm++: gamma * (IN(x) + alpha * normalized channel means) + beta on (B, H, W, C)."""

  bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = (1, 1, 1, x.shape[-1])
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean, var = _instance_stats(x)
    # Standardize the C channel means of every image across channels (population variance).
    m = jnp.mean(mean, axis=-1, keepdims=True)
    v = jnp.mean(jnp.square(mean - m), axis=-1, keepdims=True)
    mean_plus = (mean - m) / jnp.sqrt(v + _EPS)
    h = (x - mean) / jnp.sqrt(var + _EPS)
    h = h + mean_plus * self.param("alpha", _near_one(), channels)
    h = h * self.param("gamma", _near_one(), channels)
    if self.bias:
      h = h + self.param("beta", nn.initializers.zeros, channels)
    return h.astype(self.dtype)


class VarianceNorm2d(nn.Module):
  """Divide each channel by its spatial standard deviation, times a learned scale (no centering)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    _, var = _instance_stats(x)
    alpha = self.param("alpha", _near_one(), (1, 1, 1, x.shape[-1]))
    return (x / jnp.sqrt(var + _EPS) * alpha).astype(self.dtype)


# name -> constructor(dtype=...) of a normalization layer.
NORMALIZATIONS: dict[str, Callable[..., nn.Module]] = {
    "InstanceNorm++": InstanceNorm2dPlus,
    "VarianceNorm": VarianceNorm2d,
    "GroupNorm": nn.GroupNorm,
}


def get_normalization(name: str) -> Callable[..., nn.Module]:
  """Norm-layer constructor for score_sde's `config.model.normalization` name."""
  if name not in NORMALIZATIONS:
    raise InputError(f"unknown normalization {name!r}; valid names are {sorted(NORMALIZATIONS)}")
  return NORMALIZATIONS[name]
