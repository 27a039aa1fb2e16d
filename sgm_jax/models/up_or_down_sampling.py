"""FIR up/down-sampling of NHWC images (StyleGAN2's upfirdn2d), used by NCSN++.

NCSN++ (Song et al., ICLR 2021, Sec. H.1) resamples feature maps with the anti-aliasing FIR
filter [1, 3, 3, 1] of StyleGAN2 (Karras et al., 2020). Everything here is one primitive,
`upfirdn2d`: zero-insertion upsampling, padding, convolution with a 2-D FIR filter and
decimation, written as a `lax.pad` plus one depthwise `lax.conv_general_dilated`.
The fused variants (`upsample_conv_2d`, `conv_downsample_2d`) and the `Conv2d` module that holds
their weights keep the layout of the original checkpoints (params `weight`, `bias`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sgm_jax.errors import InputError
from sgm_jax.models.layers import default_init

Array = jax.Array
_DN = ("NHWC", "HWIO", "NHWC")


def setup_kernel(k: Sequence[float] | np.ndarray) -> np.ndarray:
  """A 1-D kernel becomes its outer product; the 2-D kernel is normalized to sum to 1."""
  k = np.asarray(k, dtype=np.float64)
  if k.ndim == 1:
    k = np.outer(k, k)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise InputError(f"FIR kernel must be 1-D or square 2-D, got shape {k.shape}")
  return (k / k.sum()).astype(np.float32)


def upfirdn2d(x: Array, kernel: np.ndarray, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> Array:
  """Upsample (insert up-1 zeros after each pixel), pad, convolve with `kernel`, keep every down-th.

  x: (N, H, W, C); kernel: (kh, kw), applied to each channel separately as a true convolution.
  Negative pads crop. Output size along H: (H * up + pad0 + pad1 - kh) // down + 1.
  """
  kernel = np.asarray(kernel, dtype=np.float32)
  if x.ndim != 4 or kernel.ndim != 2:
    raise InputError(f"expected NHWC input and a 2-D kernel, got {x.shape} and {kernel.shape}")
  p0, p1 = pad
  spatial = (p0, p1 + up - 1, up - 1)
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), spatial, spatial, (0, 0, 0)])
  channels = x.shape[-1]
  w = np.tile(kernel[::-1, ::-1, None, None], (1, 1, 1, channels))
  return lax.conv_general_dilated(x, jnp.asarray(w, x.dtype), window_strides=(down, down),
                                  padding="VALID", dimension_numbers=_DN,
                                  feature_group_count=channels)


def upsample_2d(x: Array, k: Sequence[float] | None = None, factor: int = 2,
                gain: float = 1.0) -> Array:
  """FIR upsampling by `factor`; a constant image stays constant (times `gain`)."""
  kernel = setup_kernel([1] * factor if k is None else k) * (gain * factor ** 2)
  p = kernel.shape[0] - factor
  return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Array, k: Sequence[float] | None = None, factor: int = 2,
                  gain: float = 1.0) -> Array:
  """FIR downsampling by `factor` (k=None is average pooling)."""
  kernel = setup_kernel([1] * factor if k is None else k) * gain
  p = kernel.shape[0] - factor
  return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: Array, w: Array, k: Sequence[float] | None = None, factor: int = 2,
                     gain: float = 1.0) -> Array:
  """Fused upsample + conv: a stride-`factor` transposed conv with HWIO `w`, then the FIR filter.

  Equals `conv(upsample_2d(x, k), w)` away from the border, padded once so the output is
  (N, H * factor, W * factor, w.shape[-1]).
  """
  conv_k = w.shape[0]
  if w.ndim != 4 or w.shape[1] != conv_k:
    raise InputError(f"expected a square HWIO kernel, got {w.shape}")
  # Transposed convolution (TF 'VALID' convention): dilate the input and fully pad it.
  hi = factor - 1 + max(conv_k - factor, 0)
  x = lax.conv_general_dilated(x, w, window_strides=(1, 1), padding=[(conv_k - 1, hi)] * 2,
                               lhs_dilation=(factor, factor), dimension_numbers=_DN)
  kernel = setup_kernel([1] * factor if k is None else k) * (gain * factor ** 2)
  p = (kernel.shape[0] - factor) - (conv_k - 1)
  return upfirdn2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: Array, w: Array, k: Sequence[float] | None = None, factor: int = 2,
                       gain: float = 1.0) -> Array:
  """Fused conv + downsample: FIR-filter with padding, then a stride-`factor` 'VALID' conv."""
  conv_k = w.shape[0]
  if w.ndim != 4 or w.shape[1] != conv_k:
    raise InputError(f"expected a square HWIO kernel, got {w.shape}")
  kernel = setup_kernel([1] * factor if k is None else k) * gain
  p = (kernel.shape[0] - factor) + (conv_k - 1)
  x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
  return lax.conv_general_dilated(x, w, window_strides=(factor, factor), padding="VALID",
                                  dimension_numbers=_DN)


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
  """Nearest-neighbour upsampling (each pixel repeated factor x factor times)."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
  """Average pooling over non-overlapping factor x factor windows."""
  n, h, w, c = x.shape
  return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class Conv2d(nn.Module):
  """Convolution with optional FIR up/down-sampling (StyleGAN2); params `weight` (HWIO), `bias`."""
  fmaps: int
  kernel: int
  up: bool = False
  down: bool = False
  resample_kernel: Sequence[int] = (1, 3, 3, 1)
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = default_init()
  dtype: Any = jnp.float32  # computation (the parameters are float32); the FIR filter follows x

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.up and self.down:
      raise InputError("Conv2d cannot both upsample and downsample")
    if self.kernel < 1 or self.kernel % 2 != 1:
      raise InputError(f"kernel size must be odd and positive, got {self.kernel}")
    w = self.param("weight", self.kernel_init, (self.kernel, self.kernel, x.shape[-1], self.fmaps))
    x, w = nn.dtypes.promote_dtype(x, w, dtype=self.dtype)
    if self.up:
      x = upsample_conv_2d(x, w, k=self.resample_kernel)
    elif self.down:
      x = conv_downsample_2d(x, w, k=self.resample_kernel)
    else:
      x = lax.conv_general_dilated(x, w, window_strides=(1, 1), padding="SAME",
                                   dimension_numbers=_DN)
    if self.use_bias:
      b = self.param("bias", jax.nn.initializers.zeros, (x.shape[-1],))
      x = x + b.astype(x.dtype).reshape((1, 1, 1, -1))
    return x
