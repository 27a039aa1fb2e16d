"""Small time-conditional score networks for quick experiments on CPU.

- `ScoreNet` ('unet_small' / 'scorenet'): the U-Net of the score-SDE tutorial (Song's Colab for
  Song et al., ICLR 2021), sized for 28x28 images (MNIST).
- `Mixer` ('mixer'): an MLP-Mixer (Tolstikhin et al., NeurIPS 2021) on 4x4 patches cut and pasted
  by strided (transposed) convolutions, sized like equinox's score-based diffusion example; time
  enters as a per-block bias rather than as an extra input channel.
- `MLP` ('mlp'): a residual-free MLP for 2-D / low-dimensional toy data x of shape (B, D).

All take `(x, time_cond, train=False)` with (B,) time labels and return an array shaped like x.
Each computes in its `dtype` with float32 parameters; time embeddings, normalization statistics
and ScoreNet's division by the std are float32.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sgm_jax import sde_lib
from sgm_jax.errors import InputError
from sgm_jax.models.layers import (Dtype, GaussianFourierProjection, at_least_float32,
                                   compute_dtype, get_act, get_timestep_embedding, noise_level)

Array = jax.Array


class TimeEmbedding(nn.Module):
  """(B,) time labels -> (B, dim): Fourier (labels of order 1) or sinusoidal DDPM features
  (labels like t * 999), then a two-layer swish MLP."""

  dim: int = 128
  kind: str = "fourier"
  fourier_scale: float = 16.0
  dtype: Dtype = jnp.float32  # of the MLP; the features are float32

  @nn.compact
  def __call__(self, time_cond: Array) -> Array:
    if self.kind == "fourier":
      features = GaussianFourierProjection(self.dim // 2, self.fourier_scale)(time_cond)
    elif self.kind == "positional":
      features = get_timestep_embedding(time_cond, self.dim)
    else:
      raise InputError(f"time embedding must be 'fourier' or 'positional', got {self.kind!r}")
    h = nn.Dense(self.dim, dtype=self.dtype)(features)
    return nn.Dense(self.dim, dtype=self.dtype)(nn.swish(h))


def label_std(sde: sde_lib.SDE, time_cond: Array) -> Array:
  """The std sigma(t) of p_{0t} for the time labels `sde.time_label(t, continuous)` a network is
  fed (sgm_jax/score.py): under the VE SDE the label is that std itself, or in discrete time the
  integer index of the noise level counted from sigma_max (`layers.noise_level`); under the others
  it is t times a constant (tutorial: 1, VP / sub-VP in continuous time: 999)."""
  if isinstance(sde, sde_lib.VESDE):
    return noise_level(time_cond, sde.sigma_min, sde.sigma_max, sde.N)
  return sde.sigma(time_cond / sde.time_label(1.0, continuous=True))


def _parity_taps(parity: int, pad_lo: int, size: int) -> tuple[slice, int]:
  """For the outputs y = 2 j + parity of a stride-1 convolution (kernel `size`, low padding
  `pad_lo`) over a 2x zero-dilated input: the kernel taps that land on real input entries (every
  other tap) and the input offset of the first, x[j + offset]."""
  first = (pad_lo - parity) % 2
  return slice(first, size, 2), (parity + first - pad_lo) // 2


def upsampling_conv(lhs: Array, rhs: Array, window_strides, padding, lhs_dilation=None,
                    rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                    precision=None) -> Array:
  """lax.conv_general_dilated for NHWC inputs, computed without the zeros of an input dilation 2.

  A convolution over a 2x zero-dilated input (a transposed convolution) splits by output parity
  into four convolutions of the undilated input with every other kernel tap, interleaved: the same
  sums in a quarter of the multiply-adds. XLA's CPU gradient of the dilated form is 4-5x slower
  than this one (benchmarks/train.py); the values agree to float32 rounding. Other convolutions
  go to lax unchanged."""
  if (tuple(lhs_dilation or (1, 1)) != (2, 2) or tuple(window_strides) != (1, 1)
      or tuple(rhs_dilation or (1, 1)) != (1, 1) or feature_group_count != 1):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision)
  n, sizes = lhs.shape[0], lhs.shape[1:3]
  out = [2 * d - 1 + lo + hi - k + 1 for d, (lo, hi), k in zip(sizes, padding, rhs.shape[:2])]
  half = [(o + 1) // 2 for o in out]
  rows = []
  for ry in range(2):
    cols = []
    for rx in range(2):
      taps, pads = [], []
      for parity, d, (lo, _), k, o in zip((ry, rx), sizes, padding, rhs.shape[:2], out):
        tap, offset = _parity_taps(parity, lo, k)
        count, width = (o - parity + 1) // 2, len(range(k)[tap])
        taps.append(tap)  # out[j] = sum_m w[tap][m] x[j + offset + m], j < count
        pads.append((-offset, count + offset + width - 1 - d))
      kernel = rhs[taps[0]][:, taps[1]]
      padded = lhs
      if any(lo + hi > k - 1 for (lo, hi), k in zip(pads, kernel.shape[:2])):
        # The padding as its own op where it makes the output larger than the input: XLA's CPU
        # gradient for the kernel of such a convolution is 3-7x slower than of the VALID one.
        padded = lax.pad(lhs, jnp.zeros((), lhs.dtype),
                         ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))
        pads = [(0, 0), (0, 0)]
      y = lax.conv_general_dilated(padded, kernel, (1, 1), pads,
                                   dimension_numbers=dimension_numbers, precision=precision)
      cols.append(jnp.pad(y, ((0, 0), (0, half[0] - y.shape[1]), (0, half[1] - y.shape[2]),
                              (0, 0))))
    rows.append(jnp.stack(cols, axis=3))                        # (n, H/2, W/2, 2, C)
  y = jnp.stack(rows, axis=2)                                   # (n, H/2, 2, W/2, 2, C)
  return y.reshape(n, 2 * half[0], 2 * half[1], -1)[:, :out[0], :out[1]]


def _up_conv(h: Array, features: int, target: tuple[int, int], same: bool = False,
             dtype: Dtype = jnp.float32) -> Array:
  """Stride-2 transposed 3x3 convolution (input-dilated conv) to spatial size `target`.

  The tutorial's (VALID) padding puts 2 zeros before the dilated input. With `same`, the padding
  inverts a SAME stride-2 convolution of a `target`-sized map, whose output i is centred on
  input 2 i - lo + 1 (lo: that convolution's low padding), so every output pixel sits over the
  input pixels it came from. Computed by `upsampling_conv` (same parameters and values).
  """
  pads = []
  for size, n in zip(target, h.shape[1:3]):
    lo = (max(2 * (n - 1) + 3 - size, 0) // 2) if same else 0
    pads.append((2 - lo, size + lo - 2 * n + 1))  # output size = (2 n - 1) + sum(pads) - 2
  return nn.Conv(features, (3, 3), padding=pads, input_dilation=(2, 2), use_bias=False,
                 conv_general_dilated=upsampling_conv, dtype=dtype)(h)


class ResidualBlock(nn.Module):
  """DDPM's residual block at a fixed width: GroupNorm, swish, 3x3 conv, + Dense(time embedding),
  GroupNorm, swish, 3x3 conv (zero-initialized, so the block starts as the identity), + input."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, embed: Array) -> Array:
    c = h.shape[-1]
    norm = lambda: nn.GroupNorm(num_groups=min(32, c), dtype=self.dtype)
    y = nn.Conv(c, (3, 3), padding="SAME", dtype=self.dtype)(nn.swish(norm()(h)))
    y = y + nn.Dense(c, dtype=self.dtype)(embed)[:, None, None, :]
    y = nn.Conv(c, (3, 3), padding="SAME", kernel_init=nn.initializers.zeros,
                dtype=self.dtype)(nn.swish(norm()(y)))
    return h + y


class ScoreNet(nn.Module):
  """Time-conditional U-Net of the score-SDE tutorial (output divided by the marginal std when
  the SDE's networks output the score).

  Four VALID 3x3 convolutions (strides 1, 2, 2, 2) and three transposed ones back with skip
  connections (`padding='SAME'`: SAME convolutions, 28 -> 28, 14, 7, 4, so border pixels are
  computed like the others instead of from the zero padding of a 26x26 map); after every
  convolution a Dense projection of the time embedding is added, then GroupNorm (4 groups first,
  then min(32, C)) and swish. The embedding is Gaussian random Fourier features of the time label
  (`embed_dim // 2` frequencies of scale `fourier_scale`, stored as the param `W` but frozen by
  stop_gradient) through Dense + swish. With an `sde`, the output is
  divided by the std of p_{0t} at the time of the label, `label_std(sde, time_cond)` (the
  tutorial uses `sde_lib.TutorialSDE()`), so the network models the score directly; `sde=None`
  leaves the output unscaled. The SDE is a frozen dataclass, so the field is hashable and compares
  by value. `time_cond` is the SDE's `time_label(t)` (t itself for the tutorial SDE, sigma(t) for
  VE). Any image of at least 17x17 works (28x28 is the tutorial's MNIST). The division by the
  std is float32 (the output is then float32 whatever `dtype`).
  """

  channels: tuple[int, ...] = (32, 64, 128, 256)
  embed_dim: int = 256
  fourier_scale: float = 30.0
  sde: Optional[sde_lib.SDE] = None
  embedding_type: str = "fourier"
  padding: str = "VALID"
  mid_blocks: int = 0  # residual blocks after each of the two lowest-resolution convolutions
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, time_cond: Array, train: bool = False) -> Array:
    if len(self.channels) != 4:
      raise InputError(f"ScoreNet needs 4 channel counts, got {self.channels}")
    if self.padding not in ("VALID", "SAME"):
      raise InputError(f"padding must be 'VALID' (the tutorial's) or 'SAME', got {self.padding!r}")
    same = self.padding == "SAME"
    act = nn.swish
    dtype = self.dtype
    if self.embedding_type == "fourier":
      embed = GaussianFourierProjection(self.embed_dim // 2, self.fourier_scale)(time_cond)
    elif self.embedding_type == "positional":  # DDPM's sinusoids, for labels like 999 t
      embed = get_timestep_embedding(time_cond, self.embed_dim)
    else:
      raise InputError(f"embedding_type must be 'fourier' or 'positional', got "
                       f"{self.embedding_type!r}")
    embed = act(nn.Dense(self.embed_dim, dtype=dtype)(embed))

    def condition(h: Array, groups: Optional[int] = None) -> Array:
      c = h.shape[-1]
      h = h + nn.Dense(c, dtype=dtype)(embed)[:, None, None, :]
      return act(nn.GroupNorm(num_groups=groups or min(32, c), dtype=dtype)(h))

    conv = lambda h, c, strides=(1, 1): nn.Conv(c, (3, 3), strides, padding=self.padding,
                                                use_bias=False, dtype=dtype)(h)
    c1, c2, c3, c4 = self.channels
    h1 = condition(conv(x.astype(dtype), c1), groups=4)
    h2 = condition(conv(h1, c2, (2, 2)))
    h3 = condition(conv(h2, c3, (2, 2)))
    for i in range(self.mid_blocks):
      h3 = ResidualBlock(dtype, name=f"ResidualBlock_3_{i}")(h3, embed)
    h4 = condition(conv(h3, c4, (2, 2)))
    for i in range(self.mid_blocks):
      h4 = ResidualBlock(dtype, name=f"ResidualBlock_4_{i}")(h4, embed)

    h = condition(_up_conv(h4, c3, h3.shape[1:3], same, dtype))
    h = condition(_up_conv(jnp.concatenate([h, h3], axis=-1), c2, h2.shape[1:3], same, dtype))
    h = condition(_up_conv(jnp.concatenate([h, h2], axis=-1), c1, h1.shape[1:3], same, dtype))
    out_pad = "SAME" if same else ((2, 2), (2, 2))
    h = nn.Conv(x.shape[-1], (3, 3), padding=out_pad, dtype=dtype)(
        jnp.concatenate([h, h1], axis=-1))
    if self.sde is not None:
      std = label_std(self.sde, time_cond)
      h = at_least_float32(h) / std.reshape((-1,) + (1,) * (h.ndim - 1))
    return h


class MixerBlock(nn.Module):
  """Mixer block on tokens (B, P, C): time bias, then token- and channel-mixing MLPs (pre-LN)."""

  mix_patch_size: int = 512
  mix_hidden_size: int = 512
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: Array, temb: Array, train: bool = False) -> Array:
    num_patches, hidden = y.shape[1], y.shape[2]
    dense = lambda features: nn.Dense(features, dtype=self.dtype)
    norm = lambda z: nn.LayerNorm(dtype=self.dtype)(z)  # float32 statistics (flax)
    y = y + dense(hidden)(nn.swish(temb))[:, None, :]

    def mlp(z: Array, width: int, out: int) -> Array:
      z = nn.gelu(dense(width)(z))
      z = nn.Dropout(self.dropout)(z, deterministic=not train)
      return dense(out)(z)

    z = jnp.swapaxes(norm(y), 1, 2)  # (B, C, P): mix along the patches
    y = y + jnp.swapaxes(mlp(z, self.mix_patch_size, num_patches), 1, 2)
    return y + mlp(norm(y), self.mix_hidden_size, hidden)


class Mixer(nn.Module):
  """MLP-Mixer score network for images (B, H, W, C) with H, W divisible by `patch_size`.

  A stride-`patch_size` convolution embeds patches as `hidden_size`-dim tokens, `num_blocks`
  Mixer blocks each add a projection of the time embedding (`TimeEmbedding`, like DDPM's
  per-block bias), and a transposed convolution pastes the tokens back into an image.
  """

  patch_size: int = 4
  hidden_size: int = 64
  mix_patch_size: int = 512
  mix_hidden_size: int = 512
  num_blocks: int = 4
  embed_dim: int = 128
  time_embedding: str = "fourier"
  fourier_scale: float = 16.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, time_cond: Array, train: bool = False) -> Array:
    B, H, W, C = x.shape
    p, dtype = self.patch_size, self.dtype
    if H % p or W % p:
      raise InputError(f"image size {H}x{W} is not divisible by patch_size={p}")
    temb = TimeEmbedding(self.embed_dim, self.time_embedding, self.fourier_scale,
                         dtype=dtype)(time_cond)
    y = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                dtype=dtype)(x.astype(dtype))
    y = y.reshape(B, (H // p) * (W // p), self.hidden_size)
    for _ in range(self.num_blocks):
      y = MixerBlock(self.mix_patch_size, self.mix_hidden_size, self.dropout,
                     dtype=dtype)(y, temb, train)
    y = nn.LayerNorm(dtype=dtype)(y).reshape(B, H // p, W // p, self.hidden_size)
    return nn.ConvTranspose(C, (p, p), strides=(p, p), padding="VALID", dtype=dtype)(y)


class MLP(nn.Module):
  """Time-conditional MLP for toy data x (B, D): every hidden layer adds Dense(act(temb))."""

  hidden: tuple[int, ...] = (128, 128, 128)
  embed_dim: int = 64
  time_embedding: str = "fourier"
  fourier_scale: float = 16.0
  nonlinearity: str = "swish"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, time_cond: Array, train: bool = False) -> Array:
    if x.ndim != 2:
      raise InputError(f"MLP expects x of shape (B, D), got {x.shape}")
    act = get_act(self.nonlinearity)
    dense = lambda features: nn.Dense(features, dtype=self.dtype)
    temb = act(TimeEmbedding(self.embed_dim, self.time_embedding, self.fourier_scale,
                             dtype=self.dtype)(time_cond))
    h = x.astype(self.dtype)
    for width in self.hidden:
      h = act(dense(width)(h) + dense(width)(temb))
      h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return dense(x.shape[-1])(h)


def from_config(config, sde: Optional[sde_lib.SDE] = None) -> nn.Module:
  """Build 'unet_small' / 'scorenet', 'mixer' or 'mlp' from config.model.* (absent keys take the
  defaults above). ScoreNet needs the SDE it is trained with unless config.model.parameterization
  names an output other than the score: it divides the score by that SDE's std."""
  m = config.model
  name = m.name
  dtype = compute_dtype(m.get("dtype", None))
  if name in ("unet_small", "scorenet"):
    # The output is divided by the std only when it is the score (the tutorial SDE, VE); under
    # the VP SDE's eps or a chosen parameterization (model.parameterization) it stays unscaled.
    output = m.get("parameterization", None)
    if sde is None and output in (None, "score"):
      raise InputError(f"model {name!r} divides its output by the std of the SDE it is trained "
                       "with when it outputs the score (model.parameterization "
                       f"{output!r}): pass that SDE, models.create_model(config, sde) with "
                       "sde = sde_lib.from_config(config)")
    output = output or sde.network_output
    return ScoreNet(channels=tuple(m.get("channels", (32, 64, 128, 256))),
                    embed_dim=m.get("embed_dim", 256), fourier_scale=m.get("fourier_scale", 30.0),
                    sde=sde if output == "score" else None,
                    embedding_type=m.get("embedding_type", "fourier"),
                    padding=m.get("padding", "VALID"), mid_blocks=m.get("mid_blocks", 0),
                    dtype=dtype)
  if name == "mixer":
    return Mixer(patch_size=m.get("patch_size", 4), hidden_size=m.get("hidden_size", 64),
                 mix_patch_size=m.get("mix_patch_size", 512),
                 mix_hidden_size=m.get("mix_hidden_size", 512),
                 num_blocks=m.get("num_blocks", 4), embed_dim=m.get("embed_dim", 128),
                 time_embedding=m.get("embedding_type", "fourier"),
                 fourier_scale=m.get("fourier_scale", 16.0), dropout=m.get("dropout", 0.0),
                 dtype=dtype)
  if name == "mlp":
    return MLP(hidden=tuple(m.get("hidden", (128, 128, 128))), embed_dim=m.get("embed_dim", 64),
               time_embedding=m.get("embedding_type", "fourier"),
               fourier_scale=m.get("fourier_scale", 16.0),
               nonlinearity=m.get("nonlinearity", "swish"), dropout=m.get("dropout", 0.0),
               dtype=dtype)
  raise InputError(f"unknown small model {name!r}; valid names are {sorted(MODELS)}")


MODELS = {name: from_config for name in ("unet_small", "scorenet", "mixer", "mlp")}
