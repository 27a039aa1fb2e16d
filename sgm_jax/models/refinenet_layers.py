"""RefineNet building blocks of NCSNv2 (Song & Ermon, "Improved Techniques for Training
Score-Based Generative Models", NeurIPS 2020; RefineNet of Lin et al., CVPR 2017).

Convolutions are created inside the calling module (auto-named `Conv_<i>` there), so the
parameter tree matches score_sde's `models/layers.py` path for path. Every block computes in its
`dtype` with float32 parameters.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.errors import InputError

Array = jax.Array
Activation = Callable[[Array], Array]


def _torch_conv_init(fan_in: int, scale: float = 1.0):
  """PyTorch's default conv init used by NCSN: U(-b, b) with b = sqrt(scale / fan_in)."""
  bound = math.sqrt((1e-10 if scale == 0 else scale) / fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def ncsn_conv(x: Array, features: int, kernel: int = 3, stride: int = 1, bias: bool = True,
              dilation: int = 1, init_scale: float = 1.0, dtype: Any = jnp.float32) -> Array:
  """kernel x kernel 'SAME' convolution with NCSN's (PyTorch-style) initialization."""
  init = _torch_conv_init(kernel * kernel * x.shape[-1], init_scale)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 use_bias=bias, kernel_dilation=(dilation, dilation), kernel_init=init,
                 bias_init=init, dtype=dtype)(x)


def _mean_pool2(x: Array) -> Array:
  """Average of the four pixels of every 2x2 block."""
  return (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4.0


class ConvMeanPool(nn.Module):
  """Convolution followed by 2x2 mean pooling (downsampling of the ResNet backbone)."""

  features: int
  kernel_size: int = 3
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    return _mean_pool2(nn.Conv(self.features, (k, k), padding="SAME", use_bias=self.use_bias,
                               dtype=self.dtype)(x))


class ResidualBlock(nn.Module):
  """Pre-activation residual block of NCSNv2's backbone; resample='down' halves the resolution
  (or, with dilation > 1, keeps it and dilates the convolutions instead)."""

  features: int
  normalization: Callable[..., nn.Module]  # constructor(dtype=...), normalization.NORMALIZATIONS
  act: Activation = nn.elu
  resample: Optional[str] = None
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.resample not in (None, "down"):
      raise InputError(f"resample must be None or 'down', got {self.resample!r}")
    d, dtype = self.dilation, self.dtype
    norm = lambda h: self.normalization(dtype=dtype)(h)
    conv = lambda h, features, **kw: ncsn_conv(h, features, dtype=dtype, **kw)
    h = self.act(norm(x))
    if self.resample == "down":
      h = conv(h, x.shape[-1], dilation=d)
      h = self.act(norm(h))
      if d > 1:
        h = conv(h, self.features, dilation=d)
        shortcut = conv(x, self.features, dilation=d)
      else:
        h = ConvMeanPool(self.features, dtype=dtype)(h)
        shortcut = ConvMeanPool(self.features, kernel_size=1, dtype=dtype)(x)
      return h + shortcut
    # No resampling: identity shortcut unless the width changes.
    if self.features == x.shape[-1]:
      shortcut = x
    elif d > 1:
      shortcut = conv(x, self.features, dilation=d)
    else:
      shortcut = conv(x, self.features, kernel=1)
    h = conv(h, self.features, dilation=d)
    h = self.act(norm(h))
    h = conv(h, self.features, dilation=d)
    return h + shortcut


class RCUBlock(nn.Module):
  """Residual conv unit: n_blocks x (residual over n_stages x (act, bias-free 3x3 conv))."""

  features: int
  n_blocks: int
  n_stages: int
  act: Activation = nn.relu
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for _ in range(self.n_blocks):
      residual = x
      for _ in range(self.n_stages):
        x = ncsn_conv(self.act(x), self.features, bias=False, dtype=self.dtype)
      x = x + residual
    return x


class CRPBlock(nn.Module):
  """Chained residual pooling: repeated (5x5 max-pool, bias-free conv), each added to the input."""

  features: int
  n_stages: int
  act: Activation = nn.relu
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = self.act(x)
    path = x
    for _ in range(self.n_stages):
      path = nn.max_pool(path, (5, 5), strides=(1, 1), padding="SAME")
      path = ncsn_conv(path, self.features, bias=False, dtype=self.dtype)
      x = x + path
    return x


class MSFBlock(nn.Module):
  """Multi-resolution fusion: conv every input, resize to `shape`, sum."""

  shape: tuple[int, int]
  features: int
  interpolation: str = "bilinear"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[Array]) -> Array:
    methods = {"bilinear": "bilinear", "nearest_neighbor": "nearest"}
    if self.interpolation not in methods:
      raise InputError(
          f"interpolation must be one of {sorted(methods)}, got {self.interpolation!r}")
    total = None
    for x in xs:
      h = ncsn_conv(x, self.features, dtype=self.dtype)
      h = jax.image.resize(h, (h.shape[0], *self.shape, self.features), methods[self.interpolation])
      total = h if total is None else total + h
    return total


class RefineBlock(nn.Module):
  """RefineNet block: RCUs on every input, fusion (unless `start`), CRP, output RCU(s)."""

  output_shape: tuple[int, int]
  features: int
  act: Activation = nn.relu
  interpolation: str = "bilinear"
  start: bool = False
  end: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[Array]) -> Array:
    dtype = self.dtype
    hs = [RCUBlock(x.shape[-1], n_blocks=2, n_stages=2, act=self.act, dtype=dtype)(x) for x in xs]
    if self.start:
      h = hs[0]
    else:
      h = MSFBlock(tuple(self.output_shape), self.features, self.interpolation, dtype=dtype)(hs)
    h = CRPBlock(self.features, n_stages=2, act=self.act, dtype=dtype)(h)
    return RCUBlock(self.features, n_blocks=3 if self.end else 1, n_stages=2, act=self.act,
                    dtype=dtype)(h)
