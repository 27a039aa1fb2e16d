"""Orbax checkpoints of the train state that survive preemption.

Two Orbax managers under the workdir:
- `checkpoints/`: periodic checkpoints, the newest `keep` kept (score_sde's `checkpoints`);
- `checkpoints-meta/`: one frequent preemption snapshot (score_sde's `checkpoints-meta`).
Saving is synchronous and atomic (Orbax writes a temporary directory and renames it once complete),
so a process killed mid-save leaves the previous checkpoints readable. `latest_step` and `restore`
look at both, so a restart resumes from whichever is newer.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

PERIODIC_DIR = "checkpoints"
SNAPSHOT_DIR = "checkpoints-meta"


class CheckpointError(ValueError):
  """A checkpoint that cannot be read into the expected train state."""


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  # No background clean-up of temporary directories left by killed saves: Orbax ignores them
  # when listing steps, and its clean-up thread can outlive a process that exits on an error.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False,
                                         cleanup_tmp_directories=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` has checkpoint folders at all (without creating anything)."""
  return any(os.path.isdir(os.path.join(workdir, d)) and os.listdir(os.path.join(workdir, d))
             for d in (PERIODIC_DIR, SNAPSHOT_DIR))


def _restore_struct(leaf: Any) -> Any:
  """The restore target of one leaf: its shape, dtype and sharding. A jax.ShapeDtypeStruct
  without a sharding (from jax.eval_shape) is restored onto the default device as a jax.Array,
  like a concrete jax.Array target (Orbax would return a numpy array); numpy leaves stay numpy."""
  if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
    device = jax.config.jax_default_device  # None, a Device or a platform name
    if not isinstance(device, jax.Device):
      device = jax.local_devices(backend=device)[0]
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                sharding=jax.sharding.SingleDeviceSharding(device))
  return ocp.utils.to_shape_dtype_struct(leaf)


class CheckpointStore:
  """Periodic checkpoints (keep-N) plus one preemption snapshot, in one workdir."""

  def __init__(self, workdir: str, keep: int = 5):
    if keep < 1:
      raise ValueError(f"keep (number of periodic checkpoints kept) must be >= 1, got {keep}")
    self.workdir = workdir
    self.periodic = _manager(os.path.join(workdir, PERIODIC_DIR), keep)
    self.snapshot = _manager(os.path.join(workdir, SNAPSHOT_DIR), 1)

  def _managers(self):
    return {"periodic": self.periodic, "snapshot": self.snapshot}

  def save(self, step: int, state: Any, kind: str = "periodic") -> None:
    """Save `state` (an unreplicated pytree of arrays) as step `step`."""
    managers = self._managers()
    if kind not in managers:
      raise ValueError(f"unknown checkpoint kind {kind!r}; valid kinds are {sorted(managers)}")
    manager = managers[kind]
    if manager.latest_step() == step:
      return
    state = jax.device_get(state)
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()

  def all_steps(self) -> list[tuple[int, str]]:
    """(step, kind) of every finished checkpoint, newest first."""
    found = [(s, kind) for kind, m in self._managers().items() for s in m.all_steps()]
    return sorted(found, reverse=True)

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[0][0] if steps else None

  def restore(self, target: Any, step: Optional[int] = None) -> Any:
    """Restore into the structure, shapes and dtypes of `target` (the newest step by default).

    `target` may be concrete arrays or jax.ShapeDtypeStruct leaves (train.abstract_train_state),
    so restoring never needs a materialized state."""
    steps = self.all_steps()
    if step is not None:
      steps = [(s, k) for s, k in steps if s == step]
      if not steps:
        raise CheckpointError(f"no checkpoint for step {step} in {self.workdir}; available steps: "
                              f"{sorted({s for s, _ in self.all_steps()})}")
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.workdir}")
    s, kind = steps[0]
    manager = self._managers()[kind]
    abstract = jax.tree_util.tree_map(_restore_struct, target)
    try:
      return manager.restore(s, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # Orbax raises many types for unreadable or mismatched files.
      path = os.path.join(manager.directory, str(s))
      raise CheckpointError(
          f"checkpoint {path} could not be read into the train state of this config ({type(e).__name__}: "
          f"{str(e)[:300]}). It is corrupt, truncated, or from a different model; move it away to "
          "resume from an earlier checkpoint.") from e

  def close(self) -> None:
    self.periodic.close()
    self.snapshot.close()
