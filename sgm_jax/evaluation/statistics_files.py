"""Reference statistics published by others, read as `FeatureStatistics` (mean, covariance).

Accepted layouts (the file's keys decide, not its name):

- score_sde's `<dataset>_stats.npz`: `pool_3` (N, 2048) Inception features of N images [and
  `logits`];
- pytorch-fid's and EDM's `.npz`: `mu` (d,) and `sigma` (d, d);
- EDM / StyleGAN `.pkl`: a dict with `mu` and `sigma`;
- this project's cache `.npz`: `mean` and `cov` [and `features` (n, d) of its first n images].

Only score_sde's files and this project's caches hold features, which KID needs; from a mean and
covariance alone only the Frechet distance can be computed.

Features are turned into statistics as everywhere here (float64, covariance with ddof=1, as
TF-GAN's Frechet distance computes them). A pickle is read with an unpickler that rebuilds numpy
arrays and plain containers only; anything else in it is refused without being run.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from sgm_jax.errors import InputError, MissingFileError
from sgm_jax.evaluation.features import FeatureStatistics
from sgm_jax.evaluation.metrics import RunningStatistics

LAYOUTS = ("score_sde: 'pool_3' (N, d) features [and 'logits']",
           "pytorch-fid / EDM: 'mu' (d,) and 'sigma' (d, d)",
           "sgm-jax cache: 'mean' (d,) and 'cov' (d, d) [and 'features' (n, d)]")

# The globals a pickle of numpy arrays in a dict needs (numpy 1.x and 2.x module names; protocol 2
# writes bytes as _codecs.encode(str, 'latin1')).
_PICKLE_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")} | {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
  """Rebuilds numpy arrays, scalars and containers; refuses every other global."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _PICKLE_GLOBALS:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a statistics pickle holds "
                                 "numpy arrays only")


def _read_pickle(path: str) -> dict[str, Any]:
  with open(path, "rb") as f:
    data = f.read()
  try:
    obj = _ArrayUnpickler(io.BytesIO(data)).load()
  except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
    raise InputError(f"reference statistics {path} is not a pickle of numpy arrays: {e}") from e
  if not isinstance(obj, dict):
    raise InputError(f"reference statistics {path} holds a {type(obj).__name__}, not a dict "
                     f"with 'mu' and 'sigma'")
  return dict(obj)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise InputError(f"reference statistics {path} is not a readable .npz: {e}") from e


def _from_mean_cov(path: str, mean: Any, cov: Any) -> FeatureStatistics:
  mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
  if mean.ndim != 1 or cov.shape != mean.shape * 2:
    raise InputError(f"reference statistics {path}: mean of shape {mean.shape} and covariance "
                     f"of shape {cov.shape} do not fit; expected (d,) and (d, d)")
  return FeatureStatistics(mean, cov, 0)


def from_arrays(arrays: dict[str, Any], path: str = "<arrays>") -> FeatureStatistics:
  """FeatureStatistics of one of the LAYOUTS; count is the number of images where the file has
  features (score_sde), else 0 (not recorded); `features` are the file's feature rows (pool_3, or
  a cache's kept features), None where it has none (mu / sigma)."""
  if "pool_3" in arrays:
    features = np.asarray(arrays["pool_3"], np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
      raise InputError(f"reference statistics {path}: 'pool_3' must be (N >= 2, d) features, "
                       f"got shape {features.shape}")
    stats = RunningStatistics(features.shape[1]).update(features)
    return FeatureStatistics(stats.mean, stats.covariance, stats.count, features=features)
  for mean_key, cov_key in (("mu", "sigma"), ("mean", "cov")):
    if mean_key in arrays and cov_key in arrays:
      stats = _from_mean_cov(path, arrays[mean_key], arrays[cov_key])
      kept = arrays.get("features") if mean_key == "mean" else None
      if kept is not None and (np.ndim(kept) != 2 or np.shape(kept)[1:] != stats.mean.shape):
        raise InputError(f"reference statistics {path}: 'features' of shape {np.shape(kept)} do "
                         f"not fit a mean of shape {stats.mean.shape}; expected (n, d)")
      return stats if kept is None else dataclasses.replace(stats, features=np.asarray(kept))
  raise InputError(f"reference statistics {path} has keys {sorted(arrays)}, none of the layouts "
                   f"this reader knows: {'; '.join(LAYOUTS)}")


def load_reference_statistics(path: str) -> FeatureStatistics:
  """The statistics in `path` (.npz, or a .pkl dict), in any of the LAYOUTS."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingFileError(f"reference statistics file {path!r} does not exist "
                           "(config.eval.reference_statistics)")
  with open(path, "rb") as f:
    is_zip = f.read(4) == b"PK\x03\x04"
  arrays = _read_npz(path) if is_zip else _read_pickle(path)
  return from_arrays(arrays, path)
