"""Layers shared by the score networks (DDPM, NCSN++, NCSNv2, the small networks, the classifier).

Initializers, activations, 1x1/3x3 convolutions and the NIN (per-pixel dense) layer follow the
conventions of DDPM (Ho et al., 2020) as used by score_sde (Song et al., ICLR 2021), so that
parameter names and shapes agree with the released checkpoints. Also the two time embeddings
(sinusoidal, Gaussian Fourier) and the SMLD noise level of a time label, by which networks with
`scale_by_sigma` divide their output.

Precision: a network computes in its `dtype` ('float32', or 'bfloat16' from config.model.dtype)
with float32 parameters, flax's `dtype` / `param_dtype` split; every layer here takes that
`dtype`. What needs more than bfloat16's 8-bit mantissa stays float32 in every network: the time
embeddings (their sine arguments reach ~1000 rad, which bfloat16 would round by several rad),
normalization statistics (flax's GroupNorm / LayerNorm compute them in float32), the attention
softmax and the division by the noise level (`divide_by_noise_level`, whose output is float32).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.errors import InputError
from sgm_jax.sde_lib import smld_sigmas

Array = jax.Array
Activation = Callable[[Array], Array]
Dtype = Any

# config.model.dtype -> the dtype a network computes in (its parameters are float32 either way).
DTYPES: dict[str, Dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: Any) -> Dtype:
  """The computation dtype named by config.model.dtype: 'float32' (also None, for configs written
  before the field existed) or 'bfloat16'."""
  if name is None:
    return jnp.float32
  if not isinstance(name, str) or name not in DTYPES:
    raise InputError(f"unknown model dtype {name!r} (config.model.dtype); valid values are "
                     f"{sorted(DTYPES)}")
  return DTYPES[name]


def at_least_float32(x: Array) -> Array:
  """x in float32 (or its own dtype when that is wider)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@functools.lru_cache(maxsize=None)
def rematerialized(module_class: type, static_argnums: tuple = ()) -> type:
  """`module_class` under flax's nn.remat (jax.checkpoint): its activations are recomputed in the
  backward pass instead of kept from the forward pass, the same values and gradients with less
  memory (config.model.remat). The class keeps its name, so auto-named instances
  (ResnetBlockDDPMpp_3) and the parameter tree are those of `module_class`. `static_argnums`
  counts `self` as 0 (a Python `train` flag must be static)."""
  lifted = nn.remat(module_class, static_argnums=static_argnums)
  lifted.__name__ = lifted.__qualname__ = module_class.__name__
  return lifted


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


class GaussianFourierProjection(nn.Module):
  """Random Fourier features [sin(2 pi W x), cos(2 pi W x)] of a (B,) input (Tancik et al., 2020).

  W ~ N(0, scale^2) of size `embedding_size` is a stored parameter, as in score_sde, but it is
  never trained (stop_gradient).
  """
  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Computed in float32 whatever the network's dtype: W x 2 pi reaches ~1000 rad."""
    w = self.param("W", jax.nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
    w = jax.lax.stop_gradient(w)
    x_proj = at_least_float32(x)[:, None] * w[None, :] * 2 * math.pi
    return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


def noise_level(labels: Array, sigma_min: float, sigma_max: float, num_scales: int) -> Array:
  """Noise level sigma of each (B,) time label.

  Integer labels index `sde_lib.smld_sigmas` (index 0 = sigma_max), the discrete VE convention
  (`VESDE.time_label(t, continuous=False)`); float labels are taken to be the noise level itself
  (`VESDE.time_label(t, continuous=True)`), which score_sde's networks could not accept.
  """
  if jnp.issubdtype(labels.dtype, jnp.integer):
    return smld_sigmas(sigma_min, sigma_max, num_scales)[labels]
  return labels


def divide_by_noise_level(h: Array, labels: Array, sigma_min: float, sigma_max: float,
                          num_scales: int) -> Array:
  """h / sigma per example, sigma the `noise_level` of its label (score_sde's scale_by_sigma), in
  float32: a bfloat16 sigma would be off by up to 2^-9 relative, a bias shared by every pixel of
  the example rather than rounding noise."""
  sigma = noise_level(labels, sigma_min, sigma_max, num_scales)
  return at_least_float32(h) / sigma.reshape((-1,) + (1,) * (h.ndim - 1))


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
            init_scale: float = 1.0, dtype: Dtype = jnp.float32) -> Array:
  """1x1 convolution with DDPM initialization (creates an `nn.Conv` in the calling module)."""
  return nn.Conv(out_ch, kernel_size=(1, 1), strides=(stride, stride), padding="SAME",
                 use_bias=bias, kernel_init=default_init(init_scale),
                 bias_init=jax.nn.initializers.zeros, dtype=dtype)(x)


def conv3x3(x: Array, out_ch: int, stride: int = 1, bias: bool = True,
            init_scale: float = 1.0, dtype: Dtype = jnp.float32) -> Array:
  """3x3 'SAME' convolution with DDPM initialization (creates an `nn.Conv` in the caller)."""
  return nn.Conv(out_ch, kernel_size=(3, 3), strides=(stride, stride), padding="SAME",
                 use_bias=bias, kernel_init=default_init(init_scale),
                 bias_init=jax.nn.initializers.zeros, dtype=dtype)(x)


class NIN(nn.Module):
  """Network-in-network: a dense layer over the channel axis at every pixel (params W, b)."""
  num_units: int
  init_scale: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param("W", default_init(self.init_scale), (x.shape[-1], self.num_units))
    b = self.param("b", jax.nn.initializers.zeros, (self.num_units,))
    x, w, b = nn.dtypes.promote_dtype(x, w, b, dtype=self.dtype)
    y = jnp.tensordot(x, w, axes=1)
    return y + b.reshape((1,) * (y.ndim - 1) + (-1,))


def pixel_attention(h: Array, out_init_scale: float, dtype: Dtype = jnp.float32) -> Array:
  """Single-head self-attention over all H*W positions of normalized (B, H, W, C) features, as in
  DDPM: NIN query, key and value, softmax(q k / sqrt(C)) v, then an output NIN (creates
  `NIN_0`..`NIN_3` in the calling module). The logits are accumulated and the softmax taken in
  float32 (a bfloat16 logit of 10 is off by up to 0.03, which the softmax exponentiates)."""
  b, height, width, c = h.shape
  q, k, v = NIN(c, dtype=dtype)(h), NIN(c, dtype=dtype)(h), NIN(c, dtype=dtype)(h)
  logits = jnp.einsum("bhwc,bHWc->bhwHW", q, k, preferred_element_type=jnp.float32) * c ** -0.5
  weights = jax.nn.softmax(logits.reshape(b, height, width, height * width), axis=-1)
  weights = weights.astype(v.dtype).reshape(b, height, width, height, width)
  h = jnp.einsum("bhwHW,bHWc->bhwc", weights, v)
  return NIN(c, init_scale=out_init_scale, dtype=dtype)(h)
