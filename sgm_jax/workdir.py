"""A training workdir: one job at a time, and one config for its whole life."""
from __future__ import annotations

import fcntl
import json
import os
from typing import Any

from sgm_jax.errors import UserError
from sgm_jax.io_utils import atomic_write

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
# The config fields that define the function a workdir trains; its checkpoints only continue the
# same values. All of config.model (network, SDE constants, parameterization, EMA, dropout) but
# NOT_IDENTITY, the data distribution and the loss. Paths (data.data_dir, data.tfrecords_path), the
# training length, batch size, optimizer (lr, grad_clip, ...), seeds, logging and evaluation may
# change between runs.
IDENTITY_FIELDS = {
    "model": None,  # every field but NOT_IDENTITY's
    "data": ("dataset", "image_size", "num_channels", "centered", "random_flip",
             "uniform_dequantization", "category", "toy_num_train"),
    "training": ("sde", "continuous", "loss", "reduce_mean", "likelihood_weighting", "weighting",
                 "importance_sampling", "time_sampling", "eps"),
}


# How the network computes, not what: the precision it computes in and whether activations are
# recomputed in the backward pass leave the parameters (tree, shapes, float32) unchanged, so a run
# resumes, evaluates or samples with either changed.
NOT_IDENTITY = {"model": ("dtype", "remat")}


class WorkdirError(UserError, RuntimeError):
  """The workdir is busy, or belongs to a different config."""


class WorkdirLock:
  """An exclusive, non-blocking lock on `workdir/.lock`, held while training runs.

  One job holds it: with several processes (jax.distributed), process 0 takes the lock for all of
  them and tells the others whether it got it, so the processes of one job share the workdir and
  every process of a second job is refused. The OS releases the lock when its holder dies (even by
  SIGKILL), so a stale lock never blocks a restart.
  """

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def __enter__(self):
    from sgm_jax import parallel
    refused = None
    if parallel.is_first_process():
      try:
        self._file = self._lock(parallel.job_id())
      except WorkdirError as e:
        refused = e
    if parallel.any_process(refused is not None) and refused is None:  # a collective decision
      self.__exit__()
      refused = WorkdirError(
          f"workdir {os.path.dirname(self.path)} is in use by another job (process 0 of this job "
          "was refused its lock); wait for it to finish or use another --workdir")
    if refused is not None:
      raise refused
    return self

  def _lock(self, holder: str):
    f = open(self.path, "a+")
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      held_by = f.read().strip() or "unknown"
      f.close()
      if held_by.isdigit():  # the lock file of an older version: a pid
        held_by = f"pid {held_by}"
      raise WorkdirError(f"workdir {os.path.dirname(self.path)} is in use by another process "
                         f"({held_by}); wait for it to finish or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(holder)
    f.flush()
    return f

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _as_dict(config: Any) -> dict:
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return dict(config)


def _identity(config: Any) -> dict:
  """The IDENTITY_FIELDS of a ConfigDict (or of the plain dict of one, as config.json holds)."""
  d = _as_dict(config)
  ident = {}
  for section, keys in IDENTITY_FIELDS.items():
    values = d.get(section) or {}
    if keys is None:
      ident[section] = {k: v for k, v in values.items() if k not in NOT_IDENTITY.get(section, ())}
    else:
      ident[section] = {k: values.get(k) for k in keys}
  return ident


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {b!r} in the workdir, {a!r} now"]


def check_or_record_config(workdir: str, config: Any, record: bool = True) -> None:
  """Record the config on first use; afterwards refuse a config that would train something else.
  With several processes all of them check, and only process 0 records (`record`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = _identity(config)
  if os.path.exists(path):
    with open(path) as f:
      try:
        saved = json.load(f)
      except json.JSONDecodeError as e:
        raise WorkdirError(f"{path} is not valid JSON ({e}); it was damaged outside sgm-jax") from e
    # The identity of the recorded config as IDENTITY_FIELDS defines it now (config.json of an
    # older version recorded other fields as its "identity").
    recorded = _identity(saved["config"]) if saved.get("config") else saved.get("identity", {})
    diffs = _differences(current, recorded)
    if diffs:
      shown = "; ".join(diffs[:8]) + ("; ..." if len(diffs) > 8 else "")
      raise WorkdirError(f"workdir {workdir} belongs to a different config ({shown}). Use a new "
                         "--workdir, or the config it was created with.")
    return
  if not record:
    return
  full = _as_dict(config) if hasattr(config, "to_json_best_effort") else {}
  with atomic_write(path, "w") as f:
    json.dump({"identity": current, "config": full}, f, indent=1, sort_keys=True)
