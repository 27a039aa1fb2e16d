"""NCSN++ and DDPM++ score networks (Song et al., ICLR 2021, Sec. 4.4 and App. H).

One configurable U-Net covers both families: NCSN++ (FIR resampling, BigGAN residual blocks,
progressive growing of the input, Fourier noise embedding) and DDPM++ (no FIR, no progressive
growing, positional time embedding). Parameter paths and shapes equal those of the original
score_sde `ncsnpp` model, so released checkpoints load without renaming.

`from_config` is the only place that reads a score_sde ConfigDict; the module itself has typed
fields.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.errors import InputError
from sgm_jax.models import layerspp
from sgm_jax.models.layers import (Dtype, GaussianFourierProjection, at_least_float32,
                                   compute_dtype, conv3x3, default_init, get_act,
                                   get_timestep_embedding, rematerialized)
from sgm_jax.sde_lib import smld_sigmas

Array = jax.Array

_PROGRESSIVE = ("none", "output_skip", "residual")
_PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
_EMBEDDINGS = ("fourier", "positional")
_RESBLOCKS = ("ddpm", "biggan")
_COMBINE = ("sum", "cat")


class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ U-Net: s_theta(x, t) for x of shape (B, H, W, C), output of the same shape.

  `time_cond` is the noise level sigma (B,) for the Fourier embedding (the network embeds
  log sigma) and the (B,) time label for the positional embedding. With `scale_by_sigma` the
  output is divided by sigma (for positional embeddings sigma is looked up in the geometric
  grid of `num_scales` levels from `sigma_max` to `sigma_min`, indexed by the integer label).
  Data not `centered` is taken to be in [0, 1] and mapped to [-1, 1]. Dropout is active only
  with `train=True` (rng collection 'dropout'). `image_size` / `num_channels`, when set, are
  checked against the input. The network computes in `dtype` with float32 parameters; the noise
  embedding, normalization statistics, attention softmax and the division by sigma are float32
  (layers.py), and the output is float32 with `scale_by_sigma`, `dtype` without.
  """
  nf: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  fir: bool = True
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  skip_rescale: bool = True
  resblock_type: str = "biggan"
  progressive: str = "none"
  progressive_input: str = "residual"
  progressive_combine: str = "sum"
  embedding_type: str = "fourier"
  fourier_scale: float = 16.0
  init_scale: float = 0.0
  nonlinearity: str = "swish"
  scale_by_sigma: bool = True
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 1000
  centered: bool = False
  image_size: Optional[int] = None
  num_channels: Optional[int] = None
  dtype: Dtype = jnp.float32
  remat: bool = False  # rematerialize each residual and attention block (layers.rematerialized)

  def _check(self) -> None:
    for name, value, allowed in (("progressive", self.progressive, _PROGRESSIVE),
                                 ("progressive_input", self.progressive_input, _PROGRESSIVE_INPUT),
                                 ("embedding_type", self.embedding_type, _EMBEDDINGS),
                                 ("resblock_type", self.resblock_type, _RESBLOCKS),
                                 ("progressive_combine", self.progressive_combine, _COMBINE)):
      if value not in allowed:
        raise InputError(f"{name} must be one of {allowed}, got {value!r}")

  def _check_input(self, x: Array, time_cond: Array) -> None:
    if x.ndim != 4:
      raise InputError(f"x must be (B, H, W, C), got shape {x.shape}")
    if time_cond.shape != (x.shape[0],):
      raise InputError(f"time_cond must have shape ({x.shape[0]},), got {time_cond.shape}")
    size, ch = self.image_size, self.num_channels
    if (size is not None and x.shape[1:3] != (size, size)) or (ch is not None and x.shape[3] != ch):
      raise InputError(f"x has shape {x.shape}, but the network was configured for "
                       f"{size}x{size} images with {ch} channels")

  @nn.compact
  def __call__(self, x: Array, time_cond: Array, train: bool = False) -> Array:
    self._check()
    self._check_input(x, time_cond)
    act = get_act(self.nonlinearity)
    nf, skip_rescale, init_scale = self.nf, self.skip_rescale, self.init_scale
    num_resolutions = len(self.ch_mult)
    channels = x.shape[-1]
    dtype = self.dtype

    # Time / noise-level embedding (float32 features, then `dtype` Dense layers).
    if self.embedding_type == "fourier":
      temb = GaussianFourierProjection(embedding_size=nf, scale=self.fourier_scale)(
          jnp.log(time_cond))
    else:
      temb = get_timestep_embedding(time_cond, nf)
    if self.conditional:
      temb = nn.Dense(nf * 4, kernel_init=default_init(), dtype=dtype)(temb)
      temb = nn.Dense(nf * 4, kernel_init=default_init(), dtype=dtype)(act(temb))
    else:
      temb = None

    fir = dict(fir=self.fir, fir_kernel=tuple(self.fir_kernel), dtype=dtype)
    # with remat, blocks recompute their activations in the backward pass (same parameter tree)
    blocks = ((lambda cls, *static: rematerialized(cls, static)) if self.remat
              else (lambda cls, *static: cls))
    attn_block = functools.partial(blocks(layerspp.AttnBlockpp), init_scale=init_scale,
                                   skip_rescale=skip_rescale, dtype=dtype)
    combiner = functools.partial(layerspp.Combine, method=self.progressive_combine, dtype=dtype)
    upsample = functools.partial(layerspp.Upsample, with_conv=self.resamp_with_conv, **fir)
    downsample = functools.partial(layerspp.Downsample, with_conv=self.resamp_with_conv, **fir)
    pyramid_upsample = functools.partial(layerspp.Upsample,
                                         with_conv=self.progressive == "residual", **fir)
    pyramid_downsample = functools.partial(layerspp.Downsample,
                                           with_conv=self.progressive_input == "residual", **fir)
    if self.resblock_type == "ddpm":
      resnet_block = functools.partial(blocks(layerspp.ResnetBlockDDPMpp, 3), act=act,
                                       dropout=self.dropout,
                                       init_scale=init_scale, skip_rescale=skip_rescale,
                                       dtype=dtype)
    else:
      resnet_block = functools.partial(blocks(layerspp.ResnetBlockBigGANpp, 3), act=act,
                                       dropout=self.dropout, init_scale=init_scale,
                                       skip_rescale=skip_rescale, **fir)

    if not self.centered:
      x = 2 * x - 1.0  # data in [0, 1] -> [-1, 1]
    x = x.astype(dtype)

    # Downsampling path.
    input_pyramid = x if self.progressive_input != "none" else None
    hs = [conv3x3(x, nf, dtype=dtype)]
    for i_level in range(num_resolutions):
      for _ in range(self.num_res_blocks):
        h = resnet_block(out_ch=nf * self.ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block()(h)
        hs.append(h)

      if i_level != num_resolutions - 1:
        if self.resblock_type == "ddpm":
          h = downsample()(hs[-1])
        else:
          h = resnet_block(down=True)(hs[-1], temb, train)

        if self.progressive_input == "input_skip":
          input_pyramid = pyramid_downsample()(input_pyramid)
          h = combiner()(input_pyramid, h)
        elif self.progressive_input == "residual":
          input_pyramid = pyramid_downsample(out_ch=h.shape[-1])(input_pyramid)
          input_pyramid = layerspp.add_skip(input_pyramid, h, skip_rescale)
          h = input_pyramid
        hs.append(h)

    # Bottleneck.
    h = hs[-1]
    h = resnet_block()(h, temb, train)
    h = attn_block()(h)
    h = resnet_block()(h, temb, train)

    # Upsampling path.
    pyramid = None
    for i_level in reversed(range(num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = resnet_block(out_ch=nf * self.ch_mult[i_level])(
            jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = attn_block()(h)

      if self.progressive != "none":
        if i_level == num_resolutions - 1:
          if self.progressive == "output_skip":
            pyramid = conv3x3(act(layerspp.group_norm(h, dtype)), channels,
                              init_scale=init_scale, dtype=dtype)
          else:
            pyramid = conv3x3(act(layerspp.group_norm(h, dtype)), h.shape[-1], dtype=dtype)
        elif self.progressive == "output_skip":
          pyramid = pyramid_upsample()(pyramid)
          pyramid = pyramid + conv3x3(act(layerspp.group_norm(h, dtype)), channels,
                                      init_scale=init_scale, dtype=dtype)
        else:
          pyramid = pyramid_upsample(out_ch=h.shape[-1])(pyramid)
          pyramid = layerspp.add_skip(pyramid, h, skip_rescale)
          h = pyramid

      if i_level != 0:
        if self.resblock_type == "ddpm":
          h = upsample()(h)
        else:
          h = resnet_block(up=True)(h, temb, train)

    assert not hs, "every skip connection must be consumed"

    if self.progressive == "output_skip":
      h = pyramid
    else:
      h = conv3x3(act(layerspp.group_norm(h, dtype)), channels, init_scale=init_scale,
                  dtype=dtype)

    if self.scale_by_sigma:
      if self.embedding_type == "fourier":
        used_sigmas = time_cond
      else:
        sigmas = smld_sigmas(self.sigma_min, self.sigma_max, self.num_scales)
        used_sigmas = sigmas[time_cond.astype(jnp.int32)]
      # in float32: a bfloat16 sigma would bias every pixel of the example alike
      h = at_least_float32(h) / used_sigmas.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return h


def from_config(config: Any) -> NCSNpp:
  """Build an `NCSNpp` from a score_sde ConfigDict (reads config.model.* and config.data.*)."""
  m = config.model
  if m.name != "ncsnpp":
    raise InputError(f"config.model.name is {m.name!r}, not 'ncsnpp'")
  if m.get("normalization", "GroupNorm") != "GroupNorm":
    raise InputError(f"NCSN++ only supports GroupNorm, got {m.normalization!r}")
  if m.get("attention_type", "ddpm") != "ddpm":
    raise InputError(f"NCSN++ only supports attention_type 'ddpm', got {m.attention_type!r}")
  return NCSNpp(
      nf=int(m.nf),
      ch_mult=tuple(int(c) for c in m.ch_mult),
      num_res_blocks=int(m.num_res_blocks),
      attn_resolutions=tuple(int(r) for r in m.attn_resolutions),
      dropout=float(m.dropout),
      resamp_with_conv=bool(m.resamp_with_conv),
      conditional=bool(m.conditional),
      fir=bool(m.fir),
      fir_kernel=tuple(int(k) for k in m.fir_kernel),
      skip_rescale=bool(m.skip_rescale),
      resblock_type=m.resblock_type.lower(),
      progressive=m.progressive.lower(),
      progressive_input=m.progressive_input.lower(),
      progressive_combine=m.progressive_combine.lower(),
      embedding_type=m.embedding_type.lower(),
      fourier_scale=float(m.get("fourier_scale", 16.0)),
      init_scale=float(m.init_scale),
      nonlinearity=m.nonlinearity.lower(),
      scale_by_sigma=bool(m.scale_by_sigma),
      sigma_min=float(m.sigma_min),
      sigma_max=float(m.sigma_max),
      num_scales=int(m.num_scales),
      centered=bool(config.data.centered),
      image_size=int(config.data.image_size),
      num_channels=int(config.data.num_channels),
      dtype=compute_dtype(m.get("dtype", None)),
      remat=bool(m.get("remat", False)),
  )
