"""The FID Inception-v3 in Flax, and a torch-free reader of PyTorch weight files.

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
reads it with allow_pickle=False and checks every name and shape.

A .pth file is either a zip archive (`<name>/data.pkl` plus one raw `<name>/data/<key>` entry
per storage; torch >= 1.6) or the legacy stream (magic number, protocol, system info, the pickled
object, the storage keys, then each storage as an int64 element count and raw bytes).
`load_torch_state_dict` reads both with an unpickler that only resolves
`torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`, `collections.OrderedDict` and the
torch storage types, all mapped to numpy; any other global is refused before anything runs.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import io
import os
import pickle
import zipfile
from typing import Any, Callable, Iterable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError, MissingFileError, UserError
from sgm_jax.io_utils import atomic_write

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
# Reading .pth files without torch.
# ----------------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "LongStorage": "i8",
    "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?",
}


class UnsafePickleError(UserError, pickle.UnpicklingError):
  """The file asks for something a plain tensor state dict never needs."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str


class _Storage:
  """A flat typed buffer; `data` is filled from the zip entry or the legacy stream."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, numel
    self.data: Optional[np.ndarray] = None

  def array(self) -> np.ndarray:
    if self.data is None:
      raise pickle.UnpicklingError("a tensor refers to a storage whose data was never stored")
    return self.data


class _StorageView(_Storage):
  """Legacy files may store a storage as a slice of another one."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    super().__init__(root.dtype, numel)
    self.root, self.offset = root, offset

  def array(self) -> np.ndarray:
    return self.root.array()[self.offset:self.offset + self.numel]


@dataclasses.dataclass
class _LazyTensor:
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  def materialize(self) -> np.ndarray:
    base = self.storage.array()
    shape, stride, offset = self.shape, self.stride, self.offset
    ok = (all(isinstance(v, int) and v >= 0 for v in (offset, *shape, *stride))
          and len(shape) == len(stride))
    if ok and all(shape):  # the last element read must lie inside the storage
      ok = offset + sum((n - 1) * s for n, s in zip(shape, stride)) < base.size
    if not ok:
      raise pickle.UnpicklingError(
          f"tensor of shape {shape}, stride {stride}, offset {offset} does not fit its storage "
          f"of {base.size} elements")
    if not all(shape):
      return np.zeros(shape, base.dtype)
    view = np.lib.stride_tricks.as_strided(
        base[offset:], shape=shape, strides=[s * base.itemsize for s in stride], writeable=False)
    return np.array(view, dtype=base.dtype.newbyteorder("="))


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None) -> _LazyTensor:
  """Stand-in for torch._utils._rebuild_tensor_v2: records where the tensor lives."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise UnsafePickleError("_rebuild_tensor_v2 called on something that is not a storage")
  return _LazyTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> _LazyTensor:
  """Stand-in for torch._utils._rebuild_parameter: a parameter is its data."""
  del requires_grad, backward_hooks
  if not isinstance(data, _LazyTensor):
    raise UnsafePickleError("_rebuild_parameter called on something that is not a tensor")
  return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals of a plain tensor state dict; storages come from `load_storage`."""

  def __init__(self, file, load_storage: Callable[[tuple], _Storage]):
    super().__init__(file, encoding="utf-8")
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafePickleError(
        f"refusing to unpickle global '{module}.{name}': only tensors, storages and "
        "OrderedDicts are allowed in a weights file")

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and pid and _ascii(pid[0]) == "storage"):
      raise UnsafePickleError(f"unexpected persistent id {pid!r:.80}")
    return self._load_storage(pid[1:])


def _ascii(value: Any) -> Any:
  return value.decode("ascii") if isinstance(value, bytes) else value


def _storage_dtype(storage_type: Any, byteorder: str) -> np.dtype:
  if not isinstance(storage_type, _StorageType):
    raise UnsafePickleError(f"storage of unknown type {storage_type!r:.80}")
  return np.dtype(_STORAGE_DTYPES[storage_type.name]).newbyteorder(
      "<" if byteorder == "little" else ">")


def _materialize(obj: Any) -> Any:
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise pickle.UnpicklingError(f"{path}: a PyTorch zip file has one data.pkl, found {pickles}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()
    storages: dict[str, _Storage] = {}

    def load_storage(data: tuple) -> _Storage:
      if len(data) != 4:
        raise UnsafePickleError(f"unexpected storage record {data!r:.80}")
      storage_type, key, _location, numel = data
      key = str(_ascii(key))
      if key not in storages:
        dtype = _storage_dtype(storage_type, byteorder)
        storage = _Storage(dtype, int(numel))
        raw = archive.read(f"{prefix}data/{key}")
        if len(raw) != storage.numel * dtype.itemsize:
          raise pickle.UnpicklingError(f"{path}: storage {key} has {len(raw)} bytes, expected "
                                       f"{storage.numel * dtype.itemsize}")
        storage.data = np.frombuffer(raw, dtype)
        storages[key] = storage
      return storages[key]

    with archive.open(pickles[0]) as f:
      return _RestrictedUnpickler(io.BytesIO(f.read()), load_storage).load()


def _load_legacy(path: str) -> Any:
  def no_storage(data: tuple) -> _Storage:
    raise UnsafePickleError("storage outside the object pickle")

  with open(path, "rb") as f:
    header = [_RestrictedUnpickler(f, no_storage).load() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
      raise pickle.UnpicklingError(f"{path} is neither a PyTorch zip file nor a legacy .pth file")
    sys_info = header[2] if isinstance(header[2], dict) else {}
    byteorder = "little" if sys_info.get("little_endian", True) else "big"
    storages: dict[str, _Storage] = {}

    def load_storage(data: tuple) -> _Storage:
      if len(data) != 5:
        raise UnsafePickleError(f"unexpected storage record {data!r:.80}")
      storage_type, key, _location, numel, view = data
      key = str(_ascii(key))
      if key not in storages:
        storages[key] = _Storage(_storage_dtype(storage_type, byteorder), int(numel))
      if view is None:
        return storages[key]
      view_key, offset, view_numel = view
      view_key = str(_ascii(view_key))
      if view_key not in storages:
        storages[view_key] = _StorageView(storages[key], int(offset), int(view_numel))
      return storages[view_key]

    result = _RestrictedUnpickler(f, load_storage).load()
    keys = _RestrictedUnpickler(f, no_storage).load()
    for key in keys:
      storage = storages.get(str(_ascii(key)))
      if storage is None or isinstance(storage, _StorageView):
        raise pickle.UnpicklingError(f"{path}: stored data for unknown storage {key!r:.40}")
      count = np.frombuffer(f.read(8), np.dtype("i8").newbyteorder(
          "<" if byteorder == "little" else ">"))
      if count.size != 1 or int(count[0]) != storage.numel:
        raise pickle.UnpicklingError(f"{path}: storage {key} is truncated or has a wrong size")
      raw = f.read(storage.numel * storage.dtype.itemsize)
      if len(raw) != storage.numel * storage.dtype.itemsize:
        raise pickle.UnpicklingError(f"{path}: storage {key} is truncated")
      storage.data = np.frombuffer(raw, storage.dtype)
  return result


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Read a PyTorch state dict (.pth, zip or legacy format) into numpy arrays, no torch needed.

  Raises UnsafePickleError, before calling anything, on a pickle that refers to any global
  besides tensors, storages and OrderedDicts (e.g. os.system through __reduce__).
  """
  path = os.fspath(path)
  result = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  if isinstance(result, dict) and "state_dict" in result and isinstance(result["state_dict"],
                                                                        dict):
    result = result["state_dict"]
  if not isinstance(result, dict):
    raise InputError(f"{path} does not hold a state dict (found {type(result).__name__})")
  state = _materialize(result)
  bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
  if bad:
    raise InputError(f"{path}: entries that are not named tensors: {bad[:5]}")
  return state


# ----------------------------------------------------------------------------------------------
# State dict <-> Flax variables (shared with efficientnet.py).
# ----------------------------------------------------------------------------------------------

# Flax leaf -> (PyTorch suffix, collection).
_LEAVES = {"kernel": ("weight", "params"), "scale": ("weight", "params"),
           "bias": ("bias", "params"), "mean": ("running_mean", "batch_stats"),
           "var": ("running_var", "batch_stats")}


def _to_torch_layout(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:  # (in, out) -> (out, in)
    return (shape[1], shape[0])
  return tuple(shape)


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def torch_layout(variables_shapes: Mapping[str, Any],
                 module_name: Callable[[tuple[str, ...]], str]
                 ) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """{torch name: (collection, flax path, torch shape)} for every leaf of a Flax variables tree.

  `module_name` turns a Flax module path into the PyTorch module name.
  """
  table = {}
  for collection, tree in variables_shapes.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      keys = tuple(p.key for p in path)
      suffix, expected_collection = _LEAVES[keys[-1]]
      assert collection == expected_collection, (collection, keys)
      name = f"{module_name(keys[:-1])}.{suffix}"
      table[name] = (collection, keys, _to_torch_layout(keys[-1], tuple(leaf.shape)))
  return table


def check_state_dict(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                     path: str, kind: str) -> None:
  """One clear error when `state` lacks a name of `expected` or has it with another shape."""
  missing = [k for k in expected if k not in state]
  wrong = [f"{k} {tuple(np.shape(state[k]))} (expected {tuple(v)})"
           for k, v in expected.items() if k in state and tuple(np.shape(state[k])) != tuple(v)]
  if missing or wrong:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)} of {len(expected)} parameters "
                   f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    if wrong:
      parts.append(f"wrong shape {', '.join(wrong[:5])}{', ...' if len(wrong) > 5 else ''}")
    raise InputError(f"weights file {path} is not {kind} weights file: {'; '.join(parts)}")


def state_dict_to_variables(state: Mapping[str, np.ndarray], layout: Mapping[str, tuple]
                            ) -> dict[str, Any]:
  """Flax variables {'params': ..., 'batch_stats': ...} from a checked state dict."""
  variables: dict[str, Any] = {}
  for name, (collection, keys, _) in layout.items():
    node = variables.setdefault(collection, {})
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = jnp.asarray(_to_flax_layout(keys[-1], np.asarray(state[name], np.float32)))
  return variables


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


def save_npz_atomic(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """np.savez through a temporary file renamed over `path`: readers never see half a file."""
  with atomic_write(os.fspath(path)) as f:
    np.savez(f, **arrays)


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
