"""Building blocks of NCSN++ / DDPM++ (Song et al., ICLR 2021, Sec. 4.4 and App. H).

Class names are part of the parameter paths (flax names a submodule `<ClassName>_<n>`), so they
match the original score_sde modules: Combine, AttnBlockpp, Upsample, Downsample,
ResnetBlockDDPMpp and ResnetBlockBigGANpp (GaussianFourierProjection is in layers.py).
Every module computes in its `dtype` with float32 parameters (see layers.py on precision).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.errors import InputError
from sgm_jax.models import up_or_down_sampling as uds
from sgm_jax.models.layers import (NIN, Activation, Dtype, conv1x1, conv3x3, default_init,
                                   pixel_attention)

Array = jax.Array
_SQRT2 = math.sqrt(2.0)


def group_norm(x: Array, dtype: Dtype = jnp.float32) -> Array:
  """GroupNorm with min(C // 4, 32) groups, as everywhere in NCSN++ (creates `GroupNorm_n`); its
  statistics and normalization are float32 (flax upcasts), the output is `dtype`."""
  return nn.GroupNorm(num_groups=min(x.shape[-1] // 4, 32), dtype=dtype)(x)


def add_skip(x: Array, h: Array, skip_rescale: bool) -> Array:
  """x + h, divided by sqrt(2) with skip rescaling (the paper's 'rescale skip connections')."""
  return (x + h) / _SQRT2 if skip_rescale else x + h


class Combine(nn.Module):
  """Merge a progressive-growing skip x into h: 1x1 conv of x, then sum or concatenation."""
  method: str = "cat"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    h = conv1x1(x, y.shape[-1], dtype=self.dtype)
    if self.method == "cat":
      return jnp.concatenate([h, y], axis=-1)
    if self.method == "sum":
      return h + y
    raise InputError(f"unknown combine method {self.method!r}; expected 'cat' or 'sum'")


class AttnBlockpp(nn.Module):
  """Self-attention over all pixels (DDPM's AttnBlock) with optional skip rescaling."""
  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = pixel_attention(group_norm(x, self.dtype), out_init_scale=self.init_scale,
                        dtype=self.dtype)
    return add_skip(x, h, self.skip_rescale)


class _Resample(nn.Module):
  """What Upsample and Downsample share: their fields and the FIR-fused 3x3 convolution."""
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32

  def _fir_conv(self, x: Array, up: bool) -> Array:
    """FIR resampling fused with a 3x3 convolution to out_ch channels (creates `Conv2d_0`)."""
    return uds.Conv2d(self.out_ch or x.shape[-1], kernel=3, up=up, down=not up,
                      resample_kernel=self.fir_kernel, use_bias=True,
                      kernel_init=default_init(), dtype=self.dtype)(x)


class Upsample(_Resample):
  """2x upsampling: nearest (+ 3x3 conv) or FIR (fused with a 3x3 conv when with_conv)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if not self.fir:
      h = uds.naive_upsample_2d(x, factor=2)
      return conv3x3(h, self.out_ch or x.shape[-1], dtype=self.dtype) if self.with_conv else h
    if not self.with_conv:
      return uds.upsample_2d(x, self.fir_kernel, factor=2)
    return self._fir_conv(x, up=True)


class Downsample(_Resample):
  """2x downsampling: average pool / strided 3x3 conv, or FIR (fused with a 3x3 conv)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if not self.fir:
      if self.with_conv:
        return conv3x3(x, self.out_ch or x.shape[-1], stride=2, dtype=self.dtype)
      return uds.naive_downsample_2d(x, factor=2)
    if not self.with_conv:
      return uds.downsample_2d(x, self.fir_kernel, factor=2)
    return self._fir_conv(x, up=False)


def _add_time_bias(h: Array, temb: Optional[Array], act: Activation,
                   dtype: Dtype = jnp.float32) -> Array:
  """Add a per-channel bias Dense(act(temb)) (creates `Dense_n`); no-op without embedding."""
  if temb is None:
    return h
  bias = nn.Dense(h.shape[-1], kernel_init=default_init(), dtype=dtype)(act(temb))
  return h + bias[:, None, None, :]


class ResnetBlockDDPMpp(nn.Module):
  """DDPM residual block (GroupNorm, act, conv, + time bias, GroupNorm, act, dropout, conv)."""
  act: Activation
  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
    c = x.shape[-1]
    out_ch = self.out_ch or c
    dtype = self.dtype
    h = conv3x3(self.act(group_norm(x, dtype)), out_ch, dtype=dtype)
    h = _add_time_bias(h, temb, self.act, dtype)
    h = self.act(group_norm(h, dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=dtype)
    if c != out_ch:
      x = conv3x3(x, out_ch, dtype=dtype) if self.conv_shortcut else NIN(out_ch, dtype=dtype)(x)
    return add_skip(x, h, self.skip_rescale)


class ResnetBlockBigGANpp(nn.Module):
  """BigGAN residual block: resampling (FIR or naive) inside the block and a 1x1 shortcut."""
  act: Activation
  up: bool = False
  down: bool = False
  out_ch: Optional[int] = None
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32

  def _resample(self, x: Array) -> Array:
    if self.up:
      return (uds.upsample_2d(x, self.fir_kernel, factor=2) if self.fir
              else uds.naive_upsample_2d(x, factor=2))
    if self.down:
      return (uds.downsample_2d(x, self.fir_kernel, factor=2) if self.fir
              else uds.naive_downsample_2d(x, factor=2))
    return x

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
    c = x.shape[-1]
    out_ch = self.out_ch or c
    dtype = self.dtype
    h = self._resample(self.act(group_norm(x, dtype)))
    x = self._resample(x)
    h = conv3x3(h, out_ch, dtype=dtype)
    h = _add_time_bias(h, temb, self.act, dtype)
    h = self.act(group_norm(h, dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=dtype)
    if c != out_ch or self.up or self.down:
      x = conv1x1(x, out_ch, dtype=dtype)
    return add_skip(x, h, self.skip_rescale)
