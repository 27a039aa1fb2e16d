"""Noise-conditional Wide-ResNet classifier p_t(y | x(t)) for class-conditional sampling
(Song et al., ICLR 2021, Appendix I.1; WRN of Zagoruyko & Komodakis, BMVC 2016).

A WRN-28-10 (three groups of `blocks_per_group` pre-activation blocks, GroupNorm instead of batch
norm) conditioned on the VE noise scale sigma: Gaussian Fourier features of log(sigma), a two-layer
MLP, and a per-block bias. Parameter-compatible with score_sde's
`models/wideresnet_noise_conditional.py` (the released CIFAR-10 classifier checkpoint is the bare
params tree of `create_classifier()`, 38,913,242 parameters). It computes in its `dtype` with
float32 parameters (config.model.dtype, as the score network); the per-example standardization of
the input, the noise embedding and normalization statistics are float32, and its logits are cast
back to float32 where they are used (controllable.NoiseConditionalLogits).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.models.layers import GaussianFourierProjection, compute_dtype

Array = jax.Array

# Kaiming-normal (fan-out) init for conv kernels, as the WRN reference implementations.
_conv_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _logits_init(key, shape, dtype=jnp.float32):
  """U(-1/sqrt(n_out), 1/sqrt(n_out)) for the final Dense kernel."""
  bound = 1.0 / math.sqrt(shape[1])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _norm_act(x: Array, name: str, relu: bool = True, dtype: Any = jnp.float32) -> Array:
  """GroupNorm with min(C/4, 32) groups (eps 1e-5), then ReLU."""
  x = nn.GroupNorm(num_groups=min(x.shape[-1] // 4, 32), epsilon=1e-5, name=name, dtype=dtype)(x)
  return jax.nn.relu(x) if relu else x


def _add_shortcut(block_x: Array, orig_x: Array) -> Array:
  """Residual sum; the shortcut is average-pooled and zero-padded in channels when shapes differ."""
  if block_x.shape[-1] != orig_x.shape[-1]:
    stride = orig_x.shape[1] // block_x.shape[1]
    orig_x = nn.avg_pool(orig_x, (stride, stride), strides=(stride, stride))
    pad = block_x.shape[-1] - orig_x.shape[-1]
    orig_x = jnp.pad(orig_x, [(0, 0), (0, 0), (0, 0), (0, pad)])
  return block_x + orig_x


class WideResnetBlock(nn.Module):
  """Pre-activation WRN block with a noise-embedding bias after the first convolution."""

  channels: int
  strides: tuple[int, int] = (1, 1)
  activate_before_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    dtype = self.dtype
    if self.activate_before_residual:
      x = _norm_act(x, "init_bn", dtype=dtype)
      h = x
    else:
      h = _norm_act(x, "init_bn", dtype=dtype)
    h = nn.Conv(self.channels, (3, 3), self.strides, padding="SAME", use_bias=False,
                kernel_init=_conv_init, name="conv1", dtype=dtype)(h)
    h = h + nn.Dense(self.channels, dtype=dtype)(nn.swish(temb))[:, None, None, :]
    h = _norm_act(h, "bn_2", dtype=dtype)
    h = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False, kernel_init=_conv_init,
                name="conv2", dtype=dtype)(h)
    return _add_shortcut(h, x)


class WideResnetGroup(nn.Module):
  """`blocks_per_group` WRN blocks; the first one carries the stride."""

  blocks_per_group: int
  channels: int
  strides: tuple[int, int] = (1, 1)
  activate_before_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    for i in range(self.blocks_per_group):
      first = i == 0
      x = WideResnetBlock(self.channels, self.strides if first else (1, 1),
                          activate_before_residual=self.activate_before_residual and first,
                          dtype=self.dtype)(x, temb)
    return x


class WideResnet(nn.Module):
  """Noise-conditional WRN classifier: logits (B, num_outputs) of images x (B, H, W, C).

  `time_cond` is the VE noise scale sigma (> 0) of x; its log is embedded. Images are
  standardized per example first. There is no dropout or batch norm, so `train` has no effect.
  """

  blocks_per_group: int = 4
  channel_multiplier: int = 10
  num_outputs: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, time_cond: Array, train: bool = False) -> Array:
    dtype = self.dtype
    n = math.prod(x.shape[1:])
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    std = jnp.std(x, axis=(1, 2, 3), keepdims=True)
    x = ((x - mean) / jnp.maximum(std, 1.0 / math.sqrt(n))).astype(dtype)

    temb = GaussianFourierProjection(embedding_size=128, scale=16.0)(jnp.log(time_cond))
    temb = nn.Dense(512, dtype=dtype)(temb)
    temb = nn.Dense(512, dtype=dtype)(nn.swish(temb))

    h = nn.Conv(16, (3, 3), padding="SAME", use_bias=False, kernel_init=_conv_init,
                name="init_conv", dtype=dtype)(x)
    k = self.channel_multiplier
    group = lambda channels, strides=(1, 1), **kw: WideResnetGroup(
        self.blocks_per_group, channels, strides, dtype=dtype, **kw)
    h = group(16 * k, activate_before_residual=True)(h, temb)
    h = group(32 * k, (2, 2))(h, temb)
    h = group(64 * k, (2, 2))(h, temb)
    h = _norm_act(h, "pre-pool-bn", dtype=dtype)
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(self.num_outputs, kernel_init=_logits_init, dtype=dtype)(h)


def create_classifier(num_classes: int = 10, blocks_per_group: int = 4,
                      channel_multiplier: int = 10, dtype: Any = jnp.float32) -> WideResnet:
  """score_sde's CIFAR-10 noise-conditional classifier (WRN-28-10, 10 classes) by default."""
  return WideResnet(blocks_per_group=blocks_per_group, channel_multiplier=channel_multiplier,
                    num_outputs=num_classes, dtype=dtype)


def from_config(config) -> WideResnet:
  """Build the classifier from the optional `config.classifier` block (keys num_classes,
  blocks_per_group, channel_multiplier); absent keys take score_sde's CIFAR-10 values. It
  computes in config.model.dtype (float32 when absent)."""
  c = config.get("classifier", None) or {}
  m = config.get("model", None) or {}
  return create_classifier(num_classes=c.get("num_classes", 10),
                           blocks_per_group=c.get("blocks_per_group", 4),
                           channel_multiplier=c.get("channel_multiplier", 10),
                           dtype=compute_dtype(m.get("dtype", None)))
