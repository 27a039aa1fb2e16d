"""Files and numbers that several modes write: sample files and their names, per-batch progress
files of a resumable computation, and how far samples overshoot the data range."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from typing import Any, Optional

import numpy as np

from sgm_jax import io_utils

OUT_OF_RANGE = 1.1  # |x| above this in the centered range [-1, 1] counts as out of range


def out_of_range_share(x: np.ndarray, centered: bool) -> float:
  """Share of pixels outside [-1.1, 1.1] (centered data; [-0.05, 1.05] for data in [0, 1]),
  before any clipping: how far a sampler's output overshoots the data range."""
  x = np.asarray(x, np.float64)
  return float(np.mean(np.abs(x if centered else 2.0 * x - 1.0) > OUT_OF_RANGE))


def settings_json(settings: Any) -> str:
  """`settings` (dicts, lists, numbers, strings, numpy values) as canonical JSON: equal settings
  give equal strings, whatever the key order or the numeric types."""
  def plain(value):
    if isinstance(value, dict):
      return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
      return plain(value.tolist())
    if isinstance(value, (list, tuple)):
      return [plain(v) for v in value]
    if isinstance(value, np.generic):
      return value.item()
    return value
  return json.dumps(plain(settings), sort_keys=True, default=str)


def _digest(text: str) -> str:
  return hashlib.sha1(text.encode()).hexdigest()[:8]


# Options that the configs pass to pc with every run (config.sampling's predictor-corrector
# fields), not spelled out in sample file names when they have these values (pc's defaults); the
# score_sde loop's `denoise` (noise removal) is on by default.
_UNNAMED_OPTIONS = {"pc": dict(predictor="reverse_diffusion", corrector="langevin", snr=0.16,
                               n_steps_each=1, probability_flow=False, denoise=False),
                    "pc_score_sde": dict(predictor="reverse_diffusion", corrector="langevin",
                                         snr=0.16, n_steps_each=1, probability_flow=False,
                                         denoise=True)}
_PLAIN_TEXT = re.compile(r"[A-Za-z0-9+-][A-Za-z0-9._+-]{0,31}")


def _name_value(value: Any) -> str:
  """An option value as it appears in a file name: numbers as Python writes them, short plain
  strings as they are, pairs of numbers comma-separated, anything else a digest."""
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, (bool, int)):
    return str(value)
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, str) and _PLAIN_TEXT.fullmatch(value):
    return value
  if (isinstance(value, (list, tuple)) and 0 < len(value) <= 4
      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
    return ",".join(_name_value(v) for v in value)
  return "h" + _digest(settings_json(value))


def _adaptive_ode(sampler: str, options: dict) -> bool:
  """Whether a sampler is the ODE with an adaptive solver (which ignores num_steps)."""
  from sgm_jax.sampling import ode
  return sampler == "ode" and ode.SOLVERS.get(options.get("solver", "dopri5"), (None, False))[1]


def tolerance_name(rtol: float, atol: float) -> str:
  """ODE tolerances in a file name: tol<r> where rtol = atol, else rtol<r>_atol<a>."""
  return (f"tol{_name_value(rtol)}" if float(rtol) == float(atol)
          else f"rtol{_name_value(rtol)}_atol{_name_value(atol)}")


def steps_phrase(sampler: str, num_steps: int, options: dict) -> str:
  """How a log line says how a sampler stepped: 'in 10 steps', or for the adaptive ODE
  'by dopri5 with adaptive steps (rtol 1e-05, atol 1e-05)'."""
  if _adaptive_ode(sampler, options):
    return (f"by {options.get('solver', 'dopri5')} with adaptive steps (rtol "
            f"{options.get('rtol', 1e-5):g}, atol {options.get('atol', 1e-5):g})")
  return f"in {int(num_steps)} steps"


def sample_file_stem(sampler: str, num_steps: int, options: dict, checkpoint_step: int) -> str:
  """The name (without .npz / .png) of --mode sample's files: what changes the samples, short.

  <sampler>[_<variant>]_<steps>steps[_<option>...]_ckpt<step>: every option in key order, as
  `key-value` (a boolean as `key` or `no-key`), except pc's config fields at pc's defaults. The
  adaptive ODE is named by its solver and tolerances instead of steps, which it does not use:
  ode_dopri5_tol1e-05 (rtol = atol), else ode_<solver>_rtol<r>_atol<a>; a fixed-step ODE solver
  by its name and steps, ode_heun_10steps. The seed and the number of samples are not in the
  name: `save_samples` keeps a file of other settings (see there).
  """
  adaptive = _adaptive_ode(sampler, options)
  options = dict(options)
  variant = options.pop("variant", "default")
  name = sampler if variant == "default" else f"{sampler}_{_name_value(variant)}"
  steps = f"{int(num_steps)}steps"
  if sampler == "ode":
    solver = options.pop("solver", "dopri5")
    rtol, atol = options.pop("rtol", 1e-5), options.pop("atol", 1e-5)
    if adaptive:
      name, steps = f"{name}_{_name_value(solver)}", tolerance_name(rtol, atol)
    else:
      name = f"{name}_{_name_value(solver)}"
  unnamed = _UNNAMED_OPTIONS.get(name, {})
  parts = [name, steps]
  for key in sorted(options):
    value = options[key]
    if key in unnamed and type(value) is type(unnamed[key]) and value == unnamed[key]:
      continue
    if isinstance(value, (bool, np.bool_)):
      parts.append(key if value else f"no-{key}")
    else:
      parts.append(f"{key}-{_name_value(value)}")
  return "_".join(parts + [f"ckpt{int(checkpoint_step)}"])


def _recorded_settings(npz_path: str) -> Optional[str]:
  """The settings a sample file was written with, or None (no such file, none recorded)."""
  try:
    with np.load(npz_path) as f:
      return str(f["settings"]) if "settings" in f.files else None
  except (OSError, ValueError, KeyError, zipfile.BadZipFile):
    return None


def _stem_for(path_stem: str, settings: str) -> str:
  """`path_stem`, or, when its files hold samples of other settings (or of settings not
  recorded), `path_stem`_<digest of the settings>: a file of other settings is never replaced."""
  for stem in (path_stem, f"{path_stem}_{_digest(settings)}"):
    files = [stem + ".npz", stem + ".png"]
    if not any(os.path.exists(p) for p in files) or _recorded_settings(files[0]) == settings:
      if stem != path_stem:
        logging.warning("%s.npz holds samples of other settings and is kept; these go to %s.npz",
                        path_stem, stem)
      return stem
  raise FileExistsError(f"{path_stem}.npz and {stem}.npz hold samples of other settings; move "
                        "them away to sample again with these settings")


def save_samples(samples: np.ndarray, config: Any, path_stem: str,
                 settings: Optional[dict] = None) -> dict:
  """Write samples as a PNG (image grid, or a scatter plot for 2-D points) and an .npz.

  With `settings` (what the samples depend on besides the name), the .npz records them, and files
  at `path_stem` of other settings are kept: the samples go to `path_stem`_<digest> instead (see
  _stem_for); the same settings replace their own files."""
  centered = bool(config.data.centered)
  arrays = dict(samples=samples)
  if settings is not None:
    arrays["settings"] = np.asarray(settings_json(settings))
    path_stem = _stem_for(path_stem, str(arrays["settings"]))
  paths = {}
  with io_utils.atomic_write(path_stem + ".npz") as f:
    np.savez(f, **arrays)
  paths["npz"] = path_stem + ".npz"
  if samples.ndim == 4:
    upscale = max(1, 128 // samples.shape[1])
    paths["png"] = io_utils.save_image_grid(samples, path_stem + ".png",
                                            data_range=(-1.0, 1.0) if centered else (0.0, 1.0),
                                            upscale=upscale)
  else:
    paths["png"] = io_utils.save_scatter(samples, path_stem + ".png")
  return paths


class BatchProgress:
  """Per-batch results of one computation: one small .npz per finished batch in `directory`
  (written atomically), so an interrupted computation resumes where it stopped and each save costs
  one batch, not everything so far.

  With `settings` (what the batches' results depend on), every batch file records them, and only
  batches of equal settings count as done: those of other settings (or of none recorded) are
  computed again, and their files replaced."""

  def __init__(self, directory: str, settings: Optional[dict] = None):
    self.directory = directory
    self.settings = None if settings is None else settings_json(settings)
    self.done: dict[int, dict[str, np.ndarray]] = {}
    os.makedirs(directory, exist_ok=True)
    others = 0
    for name in sorted(os.listdir(directory)):
      if not (name.startswith("batch_") and name.endswith(".npz")):
        continue
      path = os.path.join(directory, name)
      try:
        with np.load(path) as f:
          arrays = {k: f[k] for k in f.files}
      except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:  # damaged: recompute it
        logging.warning("evaluation progress file %s is unreadable (%s); recomputing that batch",
                        path, e)
        continue
      recorded = arrays.pop("settings", None)
      if self.settings is not None and (recorded is None or str(recorded) != self.settings):
        others += 1
        continue
      self.done[int(name[len("batch_"):-len(".npz")])] = arrays
    if others:
      logging.info("%d finished batches in %s were computed with other settings; computing them "
                   "again", others, directory)

  def add(self, i: int, **arrays) -> None:
    """Record (and write) the results of batch i."""
    self.done[i] = {k: np.atleast_1d(np.asarray(v)) for k, v in arrays.items()}
    recorded = {} if self.settings is None else {"settings": np.asarray(self.settings)}
    with io_utils.atomic_write(os.path.join(self.directory, f"batch_{i:06d}.npz")) as f:
      np.savez(f, **self.done[i], **recorded)

  def gather(self, key: str) -> np.ndarray:
    """`key` of every finished batch, concatenated in batch order."""
    return np.concatenate([np.atleast_1d(self.done[i][key]) for i in sorted(self.done)])
