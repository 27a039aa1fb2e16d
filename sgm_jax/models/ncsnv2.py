"""NCSNv2 (Song & Ermon, "Improved Techniques for Training Score-Based Generative Models",
NeurIPS 2020) as used by score SDEs (Song et al., ICLR 2021, VE SDE / SMLD).

A RefineNet: a ResNet backbone with InstanceNorm++ whose deeper stages dilate instead of
downsampling, and RefineBlocks fusing the stages back to full resolution. The network is not
conditioned on the noise level; with `scale_by_sigma` its output is divided by it (technique 3
of the paper), so it models s(x, sigma) = s(x) / sigma. Parameter-compatible with score_sde's
'ncsnv2_64', 'ncsnv2_128' and 'ncsnv2_256' (same paths, shapes and count).

NCSN v1 ('ncsn' in score_sde, noise-conditional norms) is deliberately not provided: the original
code cannot build it (its configs lack `model.num_classes`, and its ConditionalResidualBlock calls
the norm class instead of an instance), so no reference parameter tree or checkpoint exists.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.errors import InputError
from sgm_jax.models.layers import (Dtype, compute_dtype, divide_by_noise_level, get_act,
                                   rematerialized)
from sgm_jax.models.normalization import get_normalization
from sgm_jax.models.refinenet_layers import RefineBlock, ResidualBlock, ncsn_conv

Array = jax.Array

# Per stage, shallow to deep: width multiplier of nf and dilation of its convolutions.
# Every stage after the first starts with a resample='down' block (which with dilation > 1
# dilates instead of halving the resolution). Refine widths are listed deep to shallow.
ARCHITECTURES = {
    "ncsnv2_64": dict(stage_mult=(1, 2, 2, 2), stage_dilation=(1, 1, 2, 4),
                      refine_mult=(2, 2, 2, 1)),
    "ncsnv2_128": dict(stage_mult=(1, 2, 2, 4, 4), stage_dilation=(1, 1, 1, 2, 4),
                       refine_mult=(4, 2, 2, 1, 1)),
    "ncsnv2_256": dict(stage_mult=(1, 2, 2, 2, 4, 4), stage_dilation=(1, 1, 1, 1, 2, 4),
                       refine_mult=(4, 2, 2, 2, 1, 1)),
}


class NCSNv2(nn.Module):
  """NCSNv2 RefineNet; the defaults are 'ncsnv2_64' (images up to 96 px), see `ARCHITECTURES`.

  `time_cond` is used only by `scale_by_sigma`: integer labels index the noise levels stored from
  sigma_max down (discrete VE time label), float labels are the noise level itself (see
  `sgm_jax.models.layers.noise_level`). Inputs in [0, 1] are mapped to [-1, 1] unless `centered`.
  The network computes in `dtype` with float32 parameters; normalization statistics and the
  division by sigma are float32.
  """

  nf: int = 128
  stage_mult: tuple[int, ...] = (1, 2, 2, 2)
  stage_dilation: tuple[int, ...] = (1, 1, 2, 4)
  refine_mult: tuple[int, ...] = (2, 2, 2, 1)
  nonlinearity: str = "elu"
  normalization: str = "InstanceNorm++"
  interpolation: str = "bilinear"
  centered: bool = False
  scale_by_sigma: bool = True
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 232
  dtype: Dtype = jnp.float32
  remat: bool = False  # rematerialize each residual and refine block (layers.rematerialized)

  @nn.compact
  def __call__(self, x: Array, time_cond: Array, train: bool = False) -> Array:
    if not len(self.stage_mult) == len(self.stage_dilation) == len(self.refine_mult):
      raise InputError("stage_mult, stage_dilation and refine_mult must have the same length")
    act = get_act(self.nonlinearity)
    dtype = self.dtype
    norm = functools.partial(get_normalization(self.normalization), dtype=dtype)
    residual, refine = ((rematerialized(ResidualBlock), rematerialized(RefineBlock)) if self.remat
                        else (ResidualBlock, RefineBlock))
    block = functools.partial(residual, act=act, normalization=norm, dtype=dtype)

    h = ncsn_conv((x if self.centered else 2.0 * x - 1.0).astype(dtype), self.nf, dtype=dtype)
    stages = []
    for i, (mult, dilation) in enumerate(zip(self.stage_mult, self.stage_dilation)):
      width = mult * self.nf
      h = block(width, resample=None if i == 0 else "down", dilation=dilation)(h)
      h = block(width, dilation=dilation)(h)
      stages.append(h)

    ref = None
    for j, (skip, mult) in enumerate(zip(reversed(stages), self.refine_mult)):
      inputs = [skip] if ref is None else [skip, ref]
      ref = refine(skip.shape[1:3], mult * self.nf, act=act, interpolation=self.interpolation,
                        start=j == 0, end=j == len(stages) - 1, dtype=dtype)(inputs)

    h = ncsn_conv(act(norm()(ref)), x.shape[-1], dtype=dtype)
    if self.scale_by_sigma:
      h = divide_by_noise_level(h, time_cond, self.sigma_min, self.sigma_max, self.num_scales)
    return h


def from_config(config) -> NCSNv2:
  """Build 'ncsnv2_64' / 'ncsnv2_128' / 'ncsnv2_256' from config.model.* and config.data.*."""
  m = config.model
  if m.name not in ARCHITECTURES:
    raise InputError(f"unknown NCSNv2 model {m.name!r}; valid names are {sorted(ARCHITECTURES)}")
  return NCSNv2(
      nf=m.nf, **ARCHITECTURES[m.name], nonlinearity=m.nonlinearity,
      normalization=m.normalization, interpolation=m.interpolation,
      centered=config.data.centered, scale_by_sigma=m.scale_by_sigma,
      sigma_min=float(m.sigma_min), sigma_max=float(m.sigma_max), num_scales=m.num_scales,
      dtype=compute_dtype(m.get("dtype", None)), remat=bool(m.get("remat", False)))


MODELS = {name: from_config for name in ARCHITECTURES}
