"""Orbax checkpoints of the train state that survive preemption and damaged files.

Two Orbax managers under the workdir:
- `checkpoints/`: periodic checkpoints, the newest `keep` kept (score_sde's `checkpoints`);
- `checkpoints-meta/`: one frequent preemption snapshot (score_sde's `checkpoints-meta`).
Saving is synchronous and atomic (Orbax writes `<step>.orbax-checkpoint-tmp` and renames it to
`<step>` once complete), so a process killed mid-save leaves the previous checkpoints readable;
the store of the training process deletes such leftovers when it starts (`writer=True`).
`latest_step` and `restore` look at both managers, and `restore` falls back from a damaged newest
checkpoint (files that do not parse, or are missing) to the newest readable one, with a warning;
training later saves a complete checkpoint over the damaged one when it reaches that step again.
An I/O error while reading (of the disk or filesystem, not of the files' contents) is not damage:
the read is tried again, then `restore` stops with one CheckpointReadError, without falling back
and without marking anything for replacement.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from sgm_jax.errors import InputError, UserError

PERIODIC_DIR = "checkpoints"
SNAPSHOT_DIR = "checkpoints-meta"
# Orbax writes step N to "N" + this suffix (+ "-<timestamp>" in some versions), then renames it.
_TMP_SUFFIX = ocp.path.atomicity_types.TMP_DIR_SUFFIX
_UNFINISHED = re.compile(r"\d+" + re.escape(_TMP_SUFFIX) + r".*")


class CheckpointError(UserError, ValueError):
  """A checkpoint that cannot be read into the expected train state."""


class CheckpointReadError(UserError, OSError):
  """A checkpoint that could not be read because of an I/O error (of the disk or filesystem, not
  of the checkpoint's contents), on every try; nothing was skipped or marked for replacement."""


class _Unreadable(Exception):
  """A checkpoint whose files cannot be read (corrupt, truncated, missing)."""


# Seconds to wait before each new try of a read that failed with an I/O error.
IO_RETRY_DELAYS = (1.0, 4.0)
# TensorStore's message of an operating-system error: "... [OS error: Input/output error]"
_OS_ERROR = re.compile(r"\[OS error[^:\]]*: ([^\]]*)\]")
_MISSING_FILE = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _is_io_error(error: BaseException) -> bool:
  """Whether `error`, or an error it came from, is an I/O error of the disk or filesystem rather
  than damage of a checkpoint's files (which fail to parse, or are missing): an OSError other
  than a missing file, or TensorStore's report of one ('[OS error: ...]', a ValueError)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and not isinstance(error, _MISSING_FILE):
      return True
    match = _OS_ERROR.search(str(error))
    if match and "No such file or directory" not in match.group(1):
      return True
    error = error.__cause__ or error.__context__
  return False


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  # Orbax's own clean-up of temporary directories runs in a thread that can outlive a process that
  # exits on an error; the writer store does it synchronously instead (_remove_unfinished_saves).
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False,
                                         cleanup_tmp_directories=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` has checkpoint folders at all (without creating anything)."""
  return any(os.path.isdir(os.path.join(workdir, d)) and os.listdir(os.path.join(workdir, d))
             for d in (PERIODIC_DIR, SNAPSHOT_DIR))


def _remove_unfinished_saves(directory: str) -> None:
  """Delete the temporary directories that killed saves left in a manager's `directory`."""
  if not os.path.isdir(directory):
    return
  for name in sorted(os.listdir(directory)):
    if _UNFINISHED.fullmatch(name):
      logging.info("removing %s, left by a checkpoint save that did not finish",
                   os.path.join(directory, name))
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class _LoopThatFinishesItsTasks(asyncio.SelectorEventLoop):
  """An event loop whose close() first cancels and awaits the tasks still pending on it (as
  asyncio.run does), and which ignores what other threads schedule on it once closed: the end of
  a TensorStore read whose task is gone (a read that completed while the loop was closing)."""

  def close(self):
    if not self.is_running() and not self.is_closed():
      pending = [t for t in asyncio.all_tasks(self) if not t.done()]
      for task in pending:
        task.cancel()
      if pending:
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()

  def call_soon_threadsafe(self, callback, *args, context=None):
    try:
      return super().call_soon_threadsafe(callback, *args, context=context)
    except RuntimeError:
      if self.is_closed():
        return None
      raise


class _PolicyOfLoopsThatFinishTheirTasks(asyncio.DefaultEventLoopPolicy):
  _loop_factory = _LoopThatFinishesItsTasks


@contextlib.contextmanager
def _orbax_loops_finish_their_tasks():
  """Orbax runs each save and restore in a fresh event loop (asyncio_utils.run_sync) that it
  closes as soon as one array fails to read, with the other reads still pending on it. TensorStore
  reports their end to the closed loop later, from its own threads: "RuntimeError: Event loop is
  closed" tracebacks at exit (or in the middle of training, after a fallback). The loops created
  meanwhile cancel what is pending before they close, and drop such late reports."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_PolicyOfLoopsThatFinishTheirTasks())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


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


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
  """{'opt_state/1/0/mu/w': shape} of every leaf; dict keys, attribute names and sequence indices
  alike, so a train state and Orbax's tree metadata of it (nested dicts and lists) compare."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in leaves}


def _structure_differences(stored_tree: Any, target: Any) -> list[str]:
  stored, wanted = _leaf_shapes(stored_tree), _leaf_shapes(target)
  diffs = [f"{p} is not in the checkpoint" for p in sorted(wanted.keys() - stored.keys())]
  diffs += [f"{p} is only in the checkpoint" for p in sorted(stored.keys() - wanted.keys())]
  diffs += [f"{p} has shape {stored[p]} in the checkpoint, {wanted[p]} now"
            for p in sorted(wanted.keys() & stored.keys()) if stored[p] != wanted[p]]
  return diffs


class CheckpointStore:
  """Periodic checkpoints (keep-N) plus one preemption snapshot, in one workdir.

  `writer=True` is for the process that trains (and holds the workdir lock): it deletes what
  killed saves left behind, which a process that only reads must not do while another one saves.
  """

  def __init__(self, workdir: str, keep: int = 5, writer: bool = False):
    if keep < 1:
      raise InputError(f"keep (number of periodic checkpoints kept) must be >= 1, got {keep}")
    self.workdir = workdir
    if writer and jax.process_index() == 0:
      for d in (PERIODIC_DIR, SNAPSHOT_DIR):
        _remove_unfinished_saves(os.path.join(workdir, d))
    if writer:  # the other processes of a job look at the directories once they are clean
      _sync_processes("sgm_jax_checkpoint_store_clean")
    self.periodic = _manager(os.path.join(workdir, PERIODIC_DIR), keep)
    self.snapshot = _manager(os.path.join(workdir, SNAPSHOT_DIR), 1)
    self._unreadable: set[tuple[str, int]] = set()  # (kind, step) that restore could not read

  def _managers(self):
    return {"periodic": self.periodic, "snapshot": self.snapshot}

  def _path(self, kind: str, step: int) -> str:
    return os.path.join(str(self._managers()[kind].directory), str(step))

  def save(self, step: int, state: Any, kind: str = "periodic") -> None:
    """Save `state` (a pytree of arrays) as step `step`. Every process of a job calls it with
    the same step; jax.Arrays are saved as they are placed (a replicated global array is written
    once, not once per process or device), other leaves as numpy arrays.

    A step that exists already is kept, unless `restore` found it unreadable: then it is replaced
    by a complete checkpoint of `state` (see _replace)."""
    managers = self._managers()
    if kind not in managers:
      raise InputError(f"unknown checkpoint kind {kind!r}; valid kinds are {sorted(managers)}")
    manager = managers[kind]
    exists = step in manager.all_steps()
    if exists and (kind, step) not in self._unreadable:
      return
    state = jax.tree_util.tree_map(
        lambda x: x if isinstance(x, jax.Array) else np.asarray(x), state)
    with _orbax_loops_finish_their_tasks():
      if exists:
        self._replace(kind, step, state)
      else:
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()

  def _replace(self, kind: str, step: int, state: Any) -> None:
    """Save step `step` over an unreadable checkpoint of that step. The damaged one is set aside
    under a temporary name (which Orbax and restore ignore) while the new one is written, and put
    back if that fails; it is deleted only once the new one is complete. Orbax makes the new one
    appear at once (by renaming its temporary directory), so a reader finds either the damaged
    checkpoint, no checkpoint of this step (it falls back, as for the damaged one), or the
    complete new one; a kill in between leaves the damaged one as an unfinished save, deleted by
    the next writer."""
    manager = self._managers()[kind]
    final = self._path(kind, step)
    aside = f"{final}{_TMP_SUFFIX}-unreadable"
    if jax.process_index() == 0:
      os.rename(final, aside)
    _sync_processes(f"sgm_jax_replace_{kind}_{step}_aside")
    manager.reload()
    try:
      manager.save(step, args=ocp.args.StandardSave(state), force=True)
      manager.wait_until_finished()
    except BaseException:
      if jax.process_index() == 0 and not os.path.exists(final):
        os.rename(aside, final)
      manager.reload()
      raise
    if jax.process_index() == 0:
      shutil.rmtree(aside, ignore_errors=True)
    self._unreadable.discard((kind, step))
    logging.warning("replaced the unreadable checkpoint %s by a complete one", final)

  def all_steps(self) -> list[tuple[int, str]]:
    """(step, kind) of every finished checkpoint, newest first."""
    found = [(s, kind) for kind, m in self._managers().items() for s in m.all_steps()]
    return sorted(found, reverse=True)

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[0][0] if steps else None

  def restore(self, target: Any, step: Optional[int] = None) -> Any:
    """Restore into the structure, shapes and dtypes of `target`: step `step`, or by default the
    newest checkpoint that can be read.

    `target` may be concrete arrays or jax.ShapeDtypeStruct leaves (train.abstract_train_state),
    so restoring never needs a materialized state. An unreadable (corrupt, truncated) newest
    checkpoint is skipped with a warning and left in place. CheckpointError when nothing can be
    read, when the asked-for `step` cannot, or when a checkpoint is readable but holds a different
    structure than `target` (another model or optimizer); CheckpointReadError when an I/O error
    persists through the retries (no fallback then: see `_read`)."""
    candidates = self.all_steps()
    if step is not None:
      candidates = [(s, k) for s, k in candidates if s == step]
      if not candidates:
        raise CheckpointError(f"no checkpoint for step {step} in {self.workdir}; available steps: "
                              f"{sorted({s for s, _ in self.all_steps()})}")
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.workdir}")
    abstract = jax.tree_util.tree_map(_restore_struct, target)
    failures = []
    for s, kind in candidates:
      try:
        restored = self._restore_one(kind, s, abstract)
      except _Unreadable as e:
        self._unreadable.add((kind, s))
        failures.append(f"{self._path(kind, s)} could not be read ({e})")
        continue
      if failures:
        logging.warning("restored step %d from %s instead of the newer checkpoint(s) that "
                        "cannot be read, which are left in place: %s", s, self._path(kind, s),
                        "; ".join(failures))
      return restored
    if step is not None:
      raise CheckpointError(
          f"{'; '.join(failures)}. It is corrupt or truncated; choose another --checkpoint_step "
          f"(available: {sorted({s for s, _ in self.all_steps()})}) or leave it out to use the "
          "newest readable one.")
    raise CheckpointError(
        f"no readable checkpoint in {self.workdir}: {'; '.join(failures)}. They are corrupt or "
        "truncated: restore them from a copy, or train in a new --workdir.")

  def _read(self, kind: str, step: int, read: Any) -> Any:
    """read(), tried again after each of IO_RETRY_DELAYS while it fails with an I/O error
    (`_is_io_error`), then a CheckpointReadError; any other failure is damage (_Unreadable)."""
    for delay in (*IO_RETRY_DELAYS, None):
      try:
        return read()
      except Exception as e:  # Orbax raises many types for unreadable files.
        if not _is_io_error(e):
          raise _Unreadable(_reason(e)) from None
        if delay is None:
          raise CheckpointReadError(
              f"could not read checkpoint {self._path(kind, step)}: {_reason(e)} (an I/O error, "
              f"on each of {len(IO_RETRY_DELAYS) + 1} tries). The checkpoint may be intact: it "
              "was not skipped, and nothing will be written over it; run again once the disk or "
              "filesystem reads it.") from e
        logging.warning("reading checkpoint %s failed with an I/O error (%s); trying again in "
                        "%g s", self._path(kind, step), _reason(e), delay)
        time.sleep(delay)

  def _restore_one(self, kind: str, step: int, abstract: Any) -> Any:
    manager = self._managers()[kind]
    with _orbax_loops_finish_their_tasks():
      metadata = self._read(kind, step, lambda: manager.item_metadata(step))
      if metadata is not None:
        diffs = _structure_differences(getattr(metadata, "tree", metadata), abstract)
        if diffs:
          shown = "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")
          raise CheckpointError(
              f"checkpoint {self._path(kind, step)} is readable but does not fit the train state "
              f"of this config (a structure mismatch: {shown}). It was written for another model "
              "or optimizer; use the config it was trained with.")
      return self._read(kind, step,
                        lambda: manager.restore(step, args=ocp.args.StandardRestore(abstract)))

  def close(self) -> None:
    self.periodic.close()
    self.snapshot.close()


def _reason(error: BaseException) -> str:
  """The first line of the innermost cause of `error`: Orbax wraps TensorStore's message (e.g.
  'OUT_OF_RANGE: ... Requested byte range [212628, 243034) is not valid for value of size 155247')
  in its own, followed by pages of TensorStore spec."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _sync_processes(name: str) -> None:
  """Wait for every process (multi-host) to get here; nothing to do for one process."""
  from sgm_jax import parallel
  parallel.sync_processes(name)
