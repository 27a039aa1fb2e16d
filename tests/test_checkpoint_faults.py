"""Faults of a workdir: damaged checkpoints (restore falls back, training saves over them), I/O
errors while reading (tried again, then one error: no fallback, nothing overwritten), saves killed
half-way (their leftovers are deleted), and config changes between runs that do not change
what is trained (grad_clip, the data folder)."""
import asyncio
import errno
import importlib
import logging
import os
import shutil
import sys

import jax
import numpy as np
import optax
import pytest

from sgm_jax import checkpoints, train
from sgm_jax.cli import setup
from sgm_jax.cli.train import run_train
from sgm_jax.checkpoints import CheckpointError, CheckpointStore
from sgm_jax.errors import UserError
from sgm_jax.workdir import WorkdirError
import prewarmed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TMP = ".orbax-checkpoint-tmp"  # the suffix of the directory Orbax writes a step to

# A read reporting to a closed event loop from a TensorStore thread is an "unraisable" exception.
pytestmark = [pytest.mark.usefixtures("fast_compiles"),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


def _truncate_data(step_dir):
  """Cut every data file of a checkpoint to half its size (a full disk, an interrupted copy)."""
  for root, _, files in os.walk(step_dir):
    if os.path.basename(root) == "d":
      for name in files:
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


def _files(path):
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), path)] = f.read()
  return out


def _state(value):
  return {"w": np.full((64, 64), value, np.float32), "step": np.asarray(value, np.int32)}


def _restore(workdir, step=None, writer=False):
  store = CheckpointStore(str(workdir), keep=3, writer=writer)
  try:
    return store.restore(_state(0), step)
  finally:
    store.close()


def _saved(workdir, *steps_and_kinds):
  store = CheckpointStore(str(workdir), keep=3)
  for step, kind in steps_and_kinds:
    store.save(step, _state(step), kind=kind)
  store.close()


def test_restore_falls_back_to_the_newest_readable_checkpoint_and_leaves_bad_ones(tmp_path, caplog):
  _saved(tmp_path, (2, "periodic"), (3, "snapshot"), (4, "periodic"))
  newest, snapshot = tmp_path / "checkpoints" / "4", tmp_path / "checkpoints-meta" / "3"
  _truncate_data(newest)
  damaged = _files(newest)
  with caplog.at_level(logging.WARNING):
    assert int(_restore(tmp_path)["step"]) == 3
  assert f"{newest} could not be read" in caplog.text and "left in place" in caplog.text
  assert _files(newest) == damaged  # neither deleted nor moved
  _truncate_data(snapshot)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    restored = _restore(tmp_path)
  assert int(restored["step"]) == 2 and np.all(restored["w"] == 2)
  assert str(newest) in caplog.text and str(snapshot) in caplog.text
  with pytest.raises(CheckpointError, match=f"{newest} could not be read .*--checkpoint_step"):
    _restore(tmp_path, step=4)  # an explicit step does not fall back
  assert int(_restore(tmp_path, step=2)["step"]) == 2
  _truncate_data(tmp_path / "checkpoints" / "2")
  with pytest.raises(CheckpointError, match="no readable checkpoint") as error:
    _restore(tmp_path)
  for path in (newest, snapshot, tmp_path / "checkpoints" / "2"):
    assert f"{path} could not be read" in str(error.value)


def test_a_readable_checkpoint_of_another_structure_is_reported_as_a_mismatch(tmp_path):
  store = CheckpointStore(str(tmp_path))
  store.save(1, {"w": np.zeros((2, 3)), "b": np.zeros(3)})
  with pytest.raises(CheckpointError, match="structure mismatch") as error:
    store.restore({"w": np.zeros((2, 3)), "c": np.zeros(3)})
  assert "c is not in the checkpoint" in str(error.value)
  assert "b is only in the checkpoint" in str(error.value)
  assert "corrupt" not in str(error.value)
  with pytest.raises(CheckpointError,
                     match=r"w has shape \(2, 3\) in the checkpoint, \(2, 4\) now"):
    store.restore({"w": np.zeros((2, 4)), "b": np.zeros(3)})
  store.close()


def test_training_saves_a_complete_checkpoint_over_an_unreadable_one(tmp_path, monkeypatch):
  """After falling back from a damaged step 4 to step 2, training reaches step 4 again: its save
  replaces the damaged checkpoint, which stays in place until the new one is complete."""
  _saved(tmp_path, (2, "periodic"), (4, "periodic"))
  bad = tmp_path / "checkpoints" / "4"
  _truncate_data(bad)
  damaged = _files(bad)
  store = CheckpointStore(str(tmp_path), keep=3, writer=True)
  assert int(store.restore(_state(0))["step"]) == 2
  # A save that fails half-way (disk full) puts the damaged checkpoint back as it was.
  real_save = store.periodic.save

  def failing_save(step, args, **kwargs):
    raise OSError("No space left on device")

  monkeypatch.setattr(store.periodic, "save", failing_save)
  with pytest.raises(OSError, match="No space left"):
    store.save(4, _state(40))
  assert _files(bad) == damaged and sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  monkeypatch.setattr(store.periodic, "save", real_save)
  store.save(4, _state(40))
  store.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  restored = _restore(tmp_path)
  assert int(restored["step"]) == 40 and np.all(restored["w"] == 40)


def test_the_training_store_deletes_what_killed_saves_left(tmp_path):
  """A save killed before Orbax renamed `<step>.orbax-checkpoint-tmp` to `<step>` leaves that
  directory (with `default.orbax-checkpoint-tmp` in it); repeated preemption would fill the disk."""
  _saved(tmp_path, (2, "periodic"), (5, "periodic"), (3, "snapshot"))
  shutil.copytree(tmp_path / "checkpoints-meta" / "3", tmp_path / "checkpoints-meta" / "7")
  leftovers = []
  for kind_dir, step in (("checkpoints", 5), ("checkpoints-meta", 7)):
    final = tmp_path / kind_dir / str(step)
    os.rename(final / "default", final / f"default{TMP}")
    os.remove(final / "commit_success.txt")
    os.rename(final, tmp_path / kind_dir / f"{step}{TMP}")
    leftovers.append(tmp_path / kind_dir / f"{step}{TMP}")
  leftovers.append(tmp_path / "checkpoints" / f"9{TMP}-1733000000")  # the timestamped form
  shutil.copytree(leftovers[0], leftovers[-1])
  kept = {d: _files(tmp_path / d) for d in ("checkpoints/2", "checkpoints-meta/3")}

  reader = CheckpointStore(str(tmp_path))  # e.g. sampling while another process trains
  assert reader.all_steps() == [(3, "snapshot"), (2, "periodic")]
  reader.close()
  assert all(os.path.isdir(p) for p in leftovers)
  writer = CheckpointStore(str(tmp_path), writer=True)
  writer.close()
  assert not any(os.path.exists(p) for p in leftovers)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  assert sorted(os.listdir(tmp_path / "checkpoints-meta")) == ["3"]
  assert {d: _files(tmp_path / d) for d in kept} == kept
  assert int(_restore(tmp_path)["step"]) == 3


def test_a_failed_restore_leaves_no_read_that_reports_to_a_closed_event_loop(tmp_path, monkeypatch,
                                                                             capfd):
  """Orbax restores in an event loop that it closes as soon as one array fails to read; a read
  still pending then reports its end to the closed loop from a TensorStore thread, printing
  'RuntimeError: Event loop is closed' tracebacks (at exit, or later during training)."""
  import tensorstore as ts
  from orbax.checkpoint._src import asyncio_utils
  _saved(tmp_path, (1, "periodic"))
  store = CheckpointStore(str(tmp_path))
  promise, pending_read = ts.Promise.new()

  def restore_with_a_read_pending(step, args):  # what Orbax does, with a slow second array
    async def failing_read():  # TensorStore's error for a truncated file
      await asyncio.sleep(0)
      raise ValueError("OUT_OF_RANGE: Requested byte range is not valid")

    async def read_all():
      await asyncio.gather(failing_read(), pending_read)

    return asyncio_utils.run_sync(read_all())

  monkeypatch.setattr(store.periodic, "restore", restore_with_a_read_pending)
  with pytest.raises(CheckpointError, match="could not be read.*ValueError: OUT_OF_RANGE"):
    store.restore(_state(0))
  store.close()
  capfd.readouterr()
  promise.set_result(0)  # the pending read ends after the restore gave up
  err = capfd.readouterr().err
  assert "Event loop is closed" not in err and "Traceback" not in err, err


# I/O errors of the disk or filesystem, as Python and as TensorStore (a ValueError) report them
EIO = OSError(errno.EIO, "Input/output error")
TS_EIO = ValueError('FAILED_PRECONDITION: Error reading "w/.zarray" in OCDBT database at local '
                    'file "/x/default/": [OS error: Input/output error]')


class _FailingReads:
  """Replaces one read of a store's periodic manager: the first `failures` calls raise `error`,
  the others read."""

  def __init__(self, store, method, error, failures):
    self.real, self.error, self.failures, self.calls = getattr(store.periodic, method), error, \
        failures, 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    if self.calls <= self.failures:
      raise self.error
    return self.real(*args, **kwargs)


@pytest.fixture
def no_retry_wait(monkeypatch):
  monkeypatch.setattr(checkpoints, "IO_RETRY_DELAYS", (0.0, 0.0))


@pytest.mark.parametrize("method", ["restore", "item_metadata"])
@pytest.mark.parametrize("error", [EIO, TS_EIO], ids=["OSError", "tensorstore"])
def test_a_transient_io_error_is_read_again_not_taken_for_damage(tmp_path, monkeypatch, caplog,
                                                                 no_retry_wait, method, error):
  _saved(tmp_path, (2, "periodic"), (4, "periodic"))
  store = CheckpointStore(str(tmp_path), keep=3, writer=True)
  reads = _FailingReads(store, method, error, failures=2)  # the third try reads
  monkeypatch.setattr(store.periodic, method, reads)
  with caplog.at_level(logging.WARNING):
    restored = store.restore(_state(0))
  assert int(restored["step"]) == 4 and reads.calls == 3
  assert "I/O error" in caplog.text and "trying again" in caplog.text
  assert not store._unreadable
  store.save(4, _state(40))  # the step exists and was read: kept
  store.close()
  assert int(_restore(tmp_path)["step"]) == 4


@pytest.mark.parametrize("method", ["restore", "item_metadata"])
@pytest.mark.parametrize("error", [EIO, TS_EIO], ids=["OSError", "tensorstore"])
def test_a_lasting_io_error_is_one_clear_error_without_fallback_or_overwrite(
    tmp_path, monkeypatch, no_retry_wait, method, error):
  """An older readable checkpoint is there, but an I/O error is no reason to take it: restore
  stops with a CheckpointReadError (a UserError: one line from main.py) naming the checkpoint and
  the error, and a later save of that step leaves its files alone."""
  _saved(tmp_path, (2, "periodic"), (4, "periodic"))
  newest = tmp_path / "checkpoints" / "4"
  before = _files(newest)
  store = CheckpointStore(str(tmp_path), keep=3, writer=True)
  reads = _FailingReads(store, method, error, failures=10 ** 6)
  monkeypatch.setattr(store.periodic, method, reads)
  with pytest.raises(checkpoints.CheckpointReadError,
                     match=f"could not read checkpoint {newest}: .*Input/output error.* 3 tries"
                     ) as raised:
    store.restore(_state(0))
  assert isinstance(raised.value, UserError) and reads.calls == 3
  with pytest.raises(checkpoints.CheckpointReadError):
    store.restore(_state(0), step=4)
  assert not store._unreadable
  store.save(4, _state(40))
  store.close()
  assert _files(newest) == before


def test_a_file_missing_from_a_checkpoint_is_damage(tmp_path, monkeypatch, no_retry_wait):
  """TensorStore reports a missing file as an OS error too ('No such file or directory'): the
  checkpoint is damaged, and restore falls back from it."""
  _saved(tmp_path, (2, "periodic"), (4, "periodic"))
  store = CheckpointStore(str(tmp_path), keep=3)
  missing = ValueError('NOT_FOUND: Error reading "w/.zarray": [OS error: No such file or '
                       'directory]')
  reads = _FailingReads(store, "restore", missing, failures=1)
  monkeypatch.setattr(store.periodic, "restore", reads)
  assert int(store.restore(_state(0))["step"]) == 2 and reads.calls == 2  # no retry
  assert store._unreadable == {("periodic", 4)}
  store.close()


# XLA's optimizations off in the main.py runs too (tiny programs: compile time is all there is).
FAST_COMPILES = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}


def _main(*args):
  return prewarmed.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, **FAST_COMPILES))


def test_cli_samples_and_trains_on_from_the_newest_readable_checkpoint(tmp_path):
  wd = str(tmp_path / "wd")
  common = ["--config", "configs/toy_2d.py", "--workdir", wd, "--config.training.n_iters=4",
            "--config.training.snapshot_freq=4", "--config.training.snapshot_freq_for_preemption=2"]
  # The workdir of `main.py --mode train` with these flags (the same run_train, in this process);
  # the runs on it are main.py's.
  config = _config("toy_2d")
  config.training.n_iters = 4
  config.training.snapshot_freq = 4
  config.training.snapshot_freq_for_preemption = 2
  assert int(run_train(config, wd).step) == 4
  newest = os.path.join(wd, "checkpoints", "4")
  _truncate_data(newest)
  damaged = _files(newest)

  res = _main("--mode", "sample", *common, "--num_samples", "4", "--num_steps", "2")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "from checkpoint 2" in res.stdout
  assert f"{newest} could not be read" in res.stderr
  assert "Traceback" not in res.stderr and "Event loop is closed" not in res.stderr, res.stderr
  assert _files(newest) == damaged

  res = _main("--mode", "train", *common)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resumed from step 2" in res.stderr and f"{newest} could not be read" in res.stderr
  assert "Traceback" not in res.stderr and "Event loop is closed" not in res.stderr, res.stderr
  assert f"replaced the unreadable checkpoint {newest}" in res.stderr
  config = _config("toy_2d")
  _, model, _ = setup.build(config)
  _, step = setup.restore_ema_params(config, wd, model, (2,))
  assert step == 4


def _npz_config(data_file, n_iters, grad_clip=1.0):
  config = _config("digits")
  config.data.dataset = "npz"
  config.data.data_dir = str(data_file)
  config.model.hidden_size = 16
  config.model.mix_patch_size = 16
  config.model.mix_hidden_size = 16
  config.model.num_blocks = 1
  config.optim.grad_clip = grad_clip
  config.training.n_iters = n_iters
  config.training.batch_size = 4
  config.training.snapshot_freq = 100
  config.training.snapshot_freq_for_preemption = 1
  return config


def test_a_workdir_resumes_after_grad_clip_or_the_data_folder_change(tmp_path):
  data = tmp_path / "data" / "train.npz"
  data.parent.mkdir()
  images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
  np.savez(data, images=images)
  wd = str(tmp_path / "wd")
  assert int(run_train(_npz_config(data, 2, grad_clip=1.0), wd).step) == 2
  # Resumed with no clipping (grad_clip < 0: the optimizer state keeps its tree) on the same data
  # in another folder (data.data_dir is a path, not part of what is trained).
  moved = tmp_path / "elsewhere" / "train.npz"
  moved.parent.mkdir()
  shutil.copy(data, moved)
  assert int(run_train(_npz_config(moved, 3, grad_clip=-1.0), wd).step) == 3
  other = _npz_config(moved, 4)
  other.model.hidden_size = 32
  with pytest.raises(WorkdirError,
                     match=r"different config \(model.hidden_size: 16 in the workdir, 32 now\)"):
    run_train(other, wd)


def test_optimizer_state_tree_does_not_depend_on_grad_clip():
  params = {"w": np.ones((2, 3), np.float32)}
  trees = {c: jax.tree_util.tree_structure(train.OptimizerSpec(grad_clip=c).build().init(params))
           for c in (1.0, 0.5, -1.0, None)}
  assert len(set(trees.values())) == 1
  grads = {"w": np.full((2, 3), 10.0, np.float32)}
  unclipped = train.OptimizerSpec(grad_clip=-1.0, warmup=0).build()
  plain = optax.adamw(2e-4, weight_decay=0.0)
  np.testing.assert_array_equal(unclipped.update(grads, unclipped.init(params), params)[0]["w"],
                                plain.update(grads, plain.init(params), params)[0]["w"])
