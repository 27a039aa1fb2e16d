"""The DDPM U-Net (Ho et al., NeurIPS 2020) as used by score SDEs (Song et al., ICLR 2021).

Parameter-compatible with score_sde's `models/ddpm.py` ('ddpm' configs): module classes and call
order reproduce its parameter paths (`ResnetBlockDDPM_3/NIN_0/W`, `AttnBlock_1/GroupNorm_0/scale`).
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.errors import InputError
from sgm_jax.models.layers import (NIN, Dtype, compute_dtype, conv3x3, default_init,
                                   divide_by_noise_level, get_act, get_timestep_embedding,
                                   pixel_attention, rematerialized)

Array = jax.Array


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, residual (DDPM at 16x16)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.GroupNorm(num_groups=32, dtype=self.dtype)(x)
    return x + pixel_attention(h, out_init_scale=0.0, dtype=self.dtype)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    B, H, W, C = x.shape
    h = jax.image.resize(x, (B, 2 * H, 2 * W, C), "nearest")
    return conv3x3(h, C, dtype=self.dtype) if self.with_conv else h


class Downsample(nn.Module):
  """2x downsampling by a stride-2 3x3 convolution, or by 2x2 average pooling."""

  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.with_conv:
      return conv3x3(x, x.shape[-1], stride=2, dtype=self.dtype)
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class ResnetBlockDDPM(nn.Module):
  """DDPM residual block: GN-act-conv, + Dense(act(temb)), GN-act-dropout-conv, NIN shortcut."""

  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  nonlinearity: str = "swish"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
    act = get_act(self.nonlinearity)
    dtype = self.dtype
    C = x.shape[-1]
    out_ch = self.out_ch or C
    h = conv3x3(act(nn.GroupNorm(num_groups=32, dtype=dtype)(x)), out_ch, dtype=dtype)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=dtype)(act(temb))[:, None, None, :]
    h = act(nn.GroupNorm(num_groups=32, dtype=dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=0.0, dtype=dtype)
    if C != out_ch:
      x = conv3x3(x, out_ch, dtype=dtype) if self.conv_shortcut else NIN(out_ch, dtype=dtype)(x)
    return x + h


class DDPM(nn.Module):
  """DDPM U-Net (Ho et al. 2020, Appendix B); 35.2M parameters at score_sde's CIFAR-10 settings.

  `time_cond` is embedded sinusoidally (used when `conditional`). With `scale_by_sigma` (VE
  training of a DDPM network) the output is divided by the noise level of `time_cond`,
  see `layers.noise_level`, in float32. Inputs in [0, 1] are mapped to [-1, 1] unless `centered`.
  The network computes in `dtype` with float32 parameters (the embedding, normalization
  statistics and attention softmax are float32).
  """

  nf: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  nonlinearity: str = "swish"
  centered: bool = False
  scale_by_sigma: bool = False
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 1000
  dtype: Dtype = jnp.float32
  remat: bool = False  # rematerialize each residual and attention block (layers.rematerialized)

  @nn.compact
  def __call__(self, x: Array, time_cond: Array, train: bool = False) -> Array:
    act = get_act(self.nonlinearity)
    dtype = self.dtype
    if self.conditional:
      temb = get_timestep_embedding(time_cond, self.nf)  # float32
      temb = nn.Dense(4 * self.nf, kernel_init=default_init(), dtype=dtype)(temb)
      temb = nn.Dense(4 * self.nf, kernel_init=default_init(), dtype=dtype)(act(temb))
    else:
      temb = None
    resnet, attn = ((rematerialized(ResnetBlockDDPM, (3,)), rematerialized(AttnBlock))
                    if self.remat else (ResnetBlockDDPM, AttnBlock))
    block = functools.partial(resnet, dropout=self.dropout, nonlinearity=self.nonlinearity,
                              dtype=dtype)
    num_levels = len(self.ch_mult)

    h = (x if self.centered else 2.0 * x - 1.0).astype(dtype)
    hs = [conv3x3(h, self.nf, dtype=dtype)]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = block(out_ch=self.nf * mult)(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(dtype=dtype)(h)
        hs.append(h)
      if level != num_levels - 1:
        hs.append(Downsample(with_conv=self.resamp_with_conv, dtype=dtype)(hs[-1]))

    h = block()(hs[-1], temb, train)
    h = attn(dtype=dtype)(h)
    h = block()(h, temb, train)

    for level in reversed(range(num_levels)):
      for _ in range(self.num_res_blocks + 1):
        h = block(out_ch=self.nf * self.ch_mult[level])(
            jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = attn(dtype=dtype)(h)
      if level != 0:
        h = Upsample(with_conv=self.resamp_with_conv, dtype=dtype)(h)
    assert not hs

    h = act(nn.GroupNorm(num_groups=32, dtype=dtype)(h))
    h = conv3x3(h, x.shape[-1], init_scale=0.0, dtype=dtype)
    if self.scale_by_sigma:
      h = divide_by_noise_level(h, time_cond, self.sigma_min, self.sigma_max, self.num_scales)
    return h


def from_config(config) -> DDPM:
  """Build the DDPM U-Net of a score_sde config ('ddpm'): reads config.model.* and config.data.*."""
  m = config.model
  if m.get("normalization", "GroupNorm") != "GroupNorm":
    raise InputError(f"DDPM supports only GroupNorm, got {m.normalization!r}")
  return DDPM(
      nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
      resamp_with_conv=m.resamp_with_conv, conditional=m.conditional,
      nonlinearity=m.nonlinearity, centered=config.data.centered,
      scale_by_sigma=m.scale_by_sigma, sigma_min=float(m.sigma_min),
      sigma_max=float(m.sigma_max), num_scales=m.num_scales,
      dtype=compute_dtype(m.get("dtype", None)), remat=bool(m.get("remat", False)))


MODELS = {"ddpm": from_config}
