"""PyTorch weight files without torch: a restricted .pth reader and state dict <-> Flax variables.

A .pth file is either a zip archive (`<name>/data.pkl` plus one raw `<name>/data/<key>` entry
per storage; torch >= 1.6) or the legacy stream (magic number, protocol, system info, the pickled
object, the storage keys, then each storage as an int64 element count and raw bytes).
`load_torch_state_dict` reads both with an unpickler that only resolves
`torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`, `collections.OrderedDict` and the
torch storage types, all mapped to numpy; any other global is refused before anything runs.

`torch_layout`, `check_state_dict` and `state_dict_to_variables` map a checked state dict onto a
Flax variables tree (conv kernels (out, in, kh, kw) -> (kh, kw, in, out), dense (out, in) -> (in,
out), batch-norm statistics into 'batch_stats'); the feature extractors (`inception`,
`efficientnet`) only say how their module paths are named in PyTorch.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import zipfile
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError, UserError

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
# State dict <-> Flax variables.
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
