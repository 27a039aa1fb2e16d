"""The FID Inception-v3 in Flax, and the conversion of pytorch-fid's weights to a plain .npz.

`FIDInceptionV3` is the Inception-v3 (Szegedy et al., CVPR 2016) graph of 2015-12-05 that the
TensorFlow FID code (Heusel et al., NeurIPS 2017) and the Inception Score (Salimans et al.,
NeurIPS 2016) use, in the form pytorch-fid ports it: torchvision's Inception3 with 1008 classes,
no auxiliary head, and the blocks FIDInceptionA/C/E_1/E_2 whose pooling follows TensorFlow:
the average pools of Mixed_5b..5d, 6b..6e and 7b do not count padded zeros, and Mixed_7c pools
its last branch with a 3x3 max pool instead of an average pool. Convolutions have no bias and
are followed by batch norm (eps 1e-3) and ReLU. It returns the 2048-d pool3 features (FID, KID)
and the 1008 logits (Inception Score).

Weights: nothing is downloaded. Get pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(released with pytorch-fid, https://github.com/mseitzer/pytorch-fid, under "fid_weights") and
convert it once, without torch and without executing any pickled code:

  python -m sgm_jax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth \
      --out inception_fid.npz

The .npz holds float32 arrays named and shaped as in the PyTorch state dict; `load_variables`
reads it with allow_pickle=False and checks every name and shape. The .pth is read by
`torch_weights.load_torch_state_dict`, which executes no pickled code.
"""
from __future__ import annotations

import argparse
import functools
import os
import zipfile
from typing import Any, Iterable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError, MissingFileError
from sgm_jax.evaluation.torch_weights import (check_state_dict, load_torch_state_dict,
                                              state_dict_to_variables, torch_layout)
from sgm_jax.io_utils import save_npz_atomic

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
CONVERTED_FILENAME = "inception_fid.npz"
CONVERT_COMMAND = (f"python -m sgm_jax.evaluation.inception --convert {WEIGHTS_FILENAME} "
                   f"--out {CONVERTED_FILENAME}")
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75  # the smallest input the stem and the stride-2 blocks accept
FEATURE_DIM = 2048
NUM_CLASSES = 1008

# ----------------------------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------------------------


class BasicConv(nn.Module):
  """Convolution without bias, batch norm (inference statistics, eps 1e-3), ReLU."""

  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pad = ((self.padding[0], self.padding[0]), (self.padding[1], self.padding[1]))
    x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=pad, use_bias=False,
                precision=HIGHEST, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
  """TensorFlow's SAME 3x3 average pool: padded zeros are not counted."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  pool_features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = BasicConv(64, name="branch1x1")(x)
    b5 = BasicConv(48, name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17 (Mixed_6a)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorized 7x7 convolutions (Mixed_6b..6e)."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c7 = self.channels_7x7
    b1 = BasicConv(192, name="branch1x1")(x)
    b7 = BasicConv(c7, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8 (Mixed_7a)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv(192, name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3/3x1 outputs (Mixed_7b, 7c). `max_pool`: the FID graph's 7c pools
  its last branch with a 3x3 max pool (pytorch-fid's FIDInceptionE_2)."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = BasicConv(320, name="branch1x1")(x)
    b3 = BasicConv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """FID Inception-v3: (B, H, W, 3) in [-1, 1] (H, W >= 75; 299 for FID) ->
  (pool3 features (B, 2048), logits (B, 1008))."""

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, precision=HIGHEST, name="fc")(features)
    return features, logits


def preprocess(images: Array, size: Optional[int] = INPUT_SIZE) -> Array:
  """Images (B, H, W, C) in [0, 1] (float) or [0, 255] (uint8), C in {1, 3} -> (B, size, size, 3)
  in [-1, 1]: bilinear resize without antialiasing (pytorch-fid's F.interpolate,
  align_corners=False), gray replicated to RGB."""
  x = to_unit_rgb(images)
  if size is not None and x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
  return 2.0 * x - 1.0


def to_unit_rgb(images: Array) -> Array:
  """uint8 -> [0, 1] float32; floats are taken to be in [0, 1] and clipped to it (as score_sde
  clips samples before quantizing them); 1 channel -> 3."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise InputError(f"images must be (B, H, W, 1 or 3), got shape {images.shape}")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  else:
    x = jnp.clip(images.astype(jnp.float32), 0.0, 1.0)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return x


def _module_name(keys: tuple[str, ...]) -> str:
  return ".".join(keys)


@functools.lru_cache(maxsize=None)
def expected_layout() -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """{torch name: (collection, flax path, torch shape)} of the FID Inception weights."""
  shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                          jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3)))
  return torch_layout(shapes, _module_name)


def _kept(state: Mapping[str, np.ndarray], layout: Mapping[str, tuple], path: str
          ) -> dict[str, np.ndarray]:
  check_state_dict(state, {k: v[2] for k, v in layout.items()}, path, "an FID Inception")
  return {k: np.asarray(state[k], np.float32) for k in layout}


def convert(pth_path: str, out_path: str) -> None:
  """pytorch-fid's .pth -> float32 .npz of the same names and shapes (written atomically)."""
  layout = expected_layout()
  arrays = _kept(load_torch_state_dict(pth_path), layout, pth_path)
  save_npz_atomic(out_path, arrays)


def load_variables(npz_path: str) -> dict[str, Any]:
  """Flax variables of `FIDInceptionV3` from the converted .npz (checked names and shapes)."""
  npz_path = os.fspath(npz_path)
  if not os.path.exists(npz_path):
    raise MissingFileError(missing_weights_message(npz_path))
  layout = expected_layout()
  try:
    with np.load(npz_path, allow_pickle=False) as data:
      state = {k: data[k] for k in data.files}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise InputError(f"weights file {npz_path} is not an FID Inception weights file: it is not "
                     f"a plain .npz ({e}); convert {WEIGHTS_FILENAME} with: {CONVERT_COMMAND}"
                     ) from e
  return state_dict_to_variables(_kept(state, layout, npz_path), layout)


def missing_weights_message(path: Optional[str]) -> str:
  where = f"{path!r} does not exist" if path else "no weights file was given"
  return (f"The FID Inception network needs its weights, and {where}. Get pytorch-fid's "
          f"{WEIGHTS_FILENAME} (https://github.com/mseitzer/pytorch-fid/releases, "
          f"'fid_weights') and convert it once with:\n  {CONVERT_COMMAND}\n"
          f"then pass the .npz as weights_path (or use the offline extractor 'effnet').")


def main(argv: Optional[Iterable[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m sgm_jax.evaluation.inception",
      description="Convert pytorch-fid's Inception weights (.pth) to a torch-free .npz.")
  parser.add_argument("--convert", required=True, metavar="PTH", help=WEIGHTS_FILENAME)
  parser.add_argument("--out", default=CONVERTED_FILENAME, metavar="NPZ")
  args = parser.parse_args(None if argv is None else list(argv))
  convert(args.convert, args.out)
  print(f"wrote {args.out} ({len(expected_layout())} arrays) from {args.convert}")


if __name__ == "__main__":
  main()
