"""IDX files, the format of MNIST and Fashion-MNIST (gzip-compressed or plain)."""
from __future__ import annotations

import gzip
import math
import os
from typing import Optional

import numpy as np

from sgm_jax.errors import InputError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
  """Read an IDX file (gzip-compressed or plain, detected from its first bytes)."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise InputError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
  expected = math.prod(shape) * dtype.itemsize
  if len(raw) - header != expected:
    raise InputError(f"{path}: header says shape {shape} ({expected} bytes of data), "
                     f"file has {len(raw) - header}")
  data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def find_idx(directory: str, stem: str) -> Optional[str]:
  """The IDX file `stem` in `directory`, plain or .gz, dash or dot spelling; None if absent."""
  for name in (stem, stem.replace("-idx", ".idx")):
    for ext in ("", ".gz"):
      path = os.path.join(directory, name + ext)
      if os.path.isfile(path):
        return path
  return None
