"""Several processes (jax.distributed over loopback, gloo collectives between CPU devices) train
and sample like one process with all their devices; a second job is kept off a busy workdir.

Every run is a real `main.py` in subprocesses, each process with 2 forced CPU devices, on the
digits config with a tiny Mixer and a few steps. Every process has a timeout and is killed by the
test when it runs over, so no run outlives a failed test. The digits are read from .npz files of
the same images (the `digits_npz` fixture): a process then starts without scikit-learn (~1 s).
"""
import importlib
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import prewarmed
from xla_flags import with_device_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

N_ITERS = 8
# Seconds for one job. Each run needs ~10 s of CPU; on a 2-core machine shared with other work
# (load 8) a run at nice 19 took up to 5 minutes of wall time.
TIMEOUT = 900
# The digits config with a tiny Mixer: (section, field) -> value, given as --config.x.y=value.
OVERRIDES = {("model", "hidden_size"): 16, ("model", "mix_patch_size"): 16,
             ("model", "mix_hidden_size"): 16, ("model", "num_blocks"): 1,
             ("training", "batch_size"): 8, ("training", "n_iters"): N_ITERS,
             ("training", "log_freq"): 1, ("training", "snapshot_freq_for_preemption"): 2,
             ("training", "snapshot_freq"): N_ITERS, ("sampling", "batch_size"): 6}


def _overrides(data_dir):
  return {**OVERRIDES, ("data", "dataset"): "npz", ("data", "data_dir"): str(data_dir)}


def tiny_digits(data_dir):
  """main.py's flags of the digits config with a tiny Mixer, its data read from `data_dir` (the
  digits_npz fixture)."""
  return ["--config", os.path.join(ROOT, "configs", "digits.py")] + [
      f"--config.{section}.{field}={value}"
      for (section, field), value in _overrides(data_dir).items()]


def _tiny_digits_config(data_dir):
  config = importlib.import_module("configs.digits").get_config()
  for (section, field), value in _overrides(data_dir).items():
    setattr(getattr(config, section), field, value)
  return config


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory):
  """A folder of train.npz and test.npz holding the images and labels of configs/digits.py's
  splits (scikit-learn's digits, as sgm_jax's digits loader gives them): the npz dataset's input."""
  from sgm_jax import datasets
  from sgm_jax.datasets import local
  spec = datasets.from_config(importlib.import_module("configs.digits").get_config())
  folder = tmp_path_factory.mktemp("digits_npz")
  for split in ("train", "test"):
    source = local.load_digits(spec, split)
    np.savez(folder / f"{split}.npz", images=source.images, labels=source.labels)
  return folder


def _gloo_available():
  """Whether this jaxlib has gloo, the CPU collectives between processes."""
  try:
    from jax._src.lib import _jax
    return hasattr(_jax, "make_gloo_tcp_collectives")
  except ImportError:
    return False


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  # XLA's optimizations only cost compile time at these sizes.
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true",
              XLA_FLAGS=with_device_count(devices))


def _start(args, num_processes, devices, log_dir, name, program=None):
  """`num_processes` processes of main.py `args` (one job on a fresh loopback port); `program`:
  the interpreter's arguments before `args` instead of main.py's path (e.g. ['-c', code])."""
  port = _free_port()
  procs = []
  for i in range(num_processes):
    extra = ([] if num_processes == 1 else
             [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
              f"--process_id={i}"])
    out = open(os.path.join(log_dir, f"{name}_{i}.out"), "w")
    err = open(os.path.join(log_dir, f"{name}_{i}.err"), "w")
    procs.append(prewarmed.Popen([sys.executable, *(program or [os.path.join(ROOT, "main.py")]),
                                   *args, *extra],
                                 cwd=ROOT, env=_env(devices), stdout=out, stderr=err))
  return procs


def _finish(procs, log_dir, name, timeout=TIMEOUT):
  """Wait for every process (killing all of them after `timeout`); their exit codes."""
  deadline = time.time() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"{name} ran over {timeout} s: {_log(log_dir, name, 0)[-2000:]}")
  return codes


def _log(log_dir, name, i, kind="err"):
  with open(os.path.join(log_dir, f"{name}_{i}.{kind}")) as f:
    return f.read()


def _run(args, num_processes, devices, log_dir, name):
  codes = _finish(_start(args, num_processes, devices, log_dir, name), log_dir, name)
  for i, code in enumerate(codes):
    assert code == 0, f"{name} process {i}: {_log(log_dir, name, i)[-3000:]}"


def _train(workdir, data_dir, num_processes, devices, log_dir, name):
  _run(["--mode", "train", "--workdir", str(workdir), *tiny_digits(data_dir)], num_processes,
       devices, log_dir, name)


def _loss_log(workdir):
  rows = np.genfromtxt(os.path.join(workdir, "train_log.csv"), delimiter=",", names=True)
  return rows["step"], rows["loss"]


def _final_state(workdir, data_dir):
  """The step-N_ITERS train state restored in this one-device process (as sampling on another
  machine would), as numpy arrays."""
  import jax
  from sgm_jax import models, sde_lib
  from sgm_jax.checkpoints import CheckpointStore
  from sgm_jax.cli import setup
  config = _tiny_digits_config(data_dir)
  model = models.create_model(config, sde_lib.from_config(config))
  target = setup.abstract_initial_state(config, model, (8, 8, 1),
                                        setup.optimizer_from_config(config).build())
  store = CheckpointStore(str(workdir))
  try:
    return jax.tree_util.tree_map(np.asarray, store.restore(target, N_ITERS))
  finally:
    store.close()


def _assert_same_training(state, reference):
  """Two train states reached by the same steps, with the gradients summed in another order.

  Adam divides by the root of its second moment nu, so a parameter whose exact gradient is zero
  (the Mixer's token-mixing output bias, which the next LayerNorm subtracts again) moves by its
  rounding noise scaled up to about the learning rate per step. Those (nu below 1e-12) may differ
  by up to the sum of the run's learning rates; everything else agrees to float32 rounding.
  """
  import jax
  lr_sum = sum(1e-3 * s / 200 for s in range(N_ITERS))  # digits: lr 1e-3, warm-up 200
  noise = [np.max(n) < 1e-12 for n in jax.tree_util.tree_leaves(reference.opt_state[1][0].nu)]
  for part in ("params", "params_ema"):
    for a, b, only_noise in zip(jax.tree_util.tree_leaves(getattr(state, part)),
                                jax.tree_util.tree_leaves(getattr(reference, part)), noise):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=lr_sum if only_noise else 1e-7)
  assert sum(noise) <= 2, sum(noise)  # not a way around the comparison
  for a, b in zip(jax.tree_util.tree_leaves(state.opt_state),
                  jax.tree_util.tree_leaves(reference.opt_state)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-9)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, digits_npz):
  """A workdir trained by 2 processes x 2 CPU devices, and the folder of the runs' logs."""
  if not _gloo_available():
    pytest.skip("no gloo CPU collectives in this jaxlib")
  logs = tmp_path_factory.mktemp("logs")
  workdir = tmp_path_factory.mktemp("two_processes")
  _train(workdir, digits_npz, 2, 2, logs, "train_2x2")
  return workdir, logs


def test_two_processes_train_like_one_process_with_all_devices(two_process_run, digits_npz,
                                                                tmp_path):
  workdir, logs = two_process_run
  one = tmp_path / "one_process"
  _train(one, digits_npz, 1, 4, logs, "train_1x4")
  steps, losses = _loss_log(workdir)
  np.testing.assert_array_equal(steps, np.arange(1, N_ITERS + 1))  # one log, written once
  np.testing.assert_allclose(losses, _loss_log(one)[1], rtol=1e-5)
  _assert_same_training(_final_state(workdir, digits_npz), _final_state(one, digits_npz))
  # Process 0 prints the result; process 1 does not (gloo's own lines go around sys.stdout).
  assert "trained to step 8" in _log(logs, "train_2x2", 0, "out")
  assert "trained" not in _log(logs, "train_2x2", 1, "out")
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(N_ITERS)]


def test_a_killed_process_and_a_restarted_job_resume_like_an_uninterrupted_run(two_process_run,
                                                                                digits_npz,
                                                                                tmp_path):
  reference, logs = two_process_run
  work = tmp_path / "killed"
  args = ["--mode", "train", "--workdir", str(work), *tiny_digits(digits_npz)]
  procs = _start(args, 2, 2, logs, "killed")
  meta = work / "checkpoints-meta"
  deadline = time.time() + TIMEOUT
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if meta.exists() and any(p.name.isdigit() for p in meta.iterdir()):
      break
    time.sleep(0.02)
  running = all(p.poll() is None for p in procs)
  procs[1].send_signal(signal.SIGKILL)  # one process of the job dies ...
  try:  # ... and the other one, left alone in its collectives, soon after
    procs[0].wait(timeout=10)
  except subprocess.TimeoutExpired:
    procs[0].kill()
  for p in procs:
    p.wait()
  assert running, f"training ended before it could be killed: {_log(logs, 'killed', 0)[-2000:]}"
  store_steps = sorted(int(p.name) for p in meta.iterdir() if p.name.isdigit())
  assert store_steps and store_steps[-1] < N_ITERS, store_steps
  _run(args, 2, 2, logs, "resumed")
  assert f"resumed from step {store_steps[-1]}" in _log(logs, "resumed", 0)
  steps, losses = _loss_log(work)
  np.testing.assert_array_equal(steps, np.arange(1, N_ITERS + 1))
  np.testing.assert_array_equal(losses, _loss_log(reference)[1])
  import jax
  for a, b in zip(jax.tree_util.tree_leaves(_final_state(work, digits_npz)),
                  jax.tree_util.tree_leaves(_final_state(reference, digits_npz))):
    np.testing.assert_array_equal(a, b)


def test_two_processes_sample_together_into_one_file(two_process_run, digits_npz):
  """10 samples, batches of 6 over 4 devices (padded to 8): one .npz of 10 samples, written by
  process 0, equal to what one process on one device samples (deterministic DDIM)."""
  workdir, logs = two_process_run
  args = ["--mode", "sample", "--workdir", str(workdir), *tiny_digits(digits_npz),
          "--sampler", "ddim", "--num_steps", "3", "--num_samples", "10"]
  _run(args, 2, 2, logs, "sample_2x2")
  assert sorted(os.listdir(workdir / "samples")) == [f"ddim_3steps_ckpt{N_ITERS}.npz",
                                                     f"ddim_3steps_ckpt{N_ITERS}.png"]
  assert "10 samples" in _log(logs, "sample_2x2", 0, "out")
  assert "samples" not in _log(logs, "sample_2x2", 1, "out")
  with np.load(workdir / "samples" / f"ddim_3steps_ckpt{N_ITERS}.npz") as f:
    together = f["samples"]
  assert together.shape == (10, 8, 8, 1)
  # The same samples from this (one-device) process: sample j starts from the j-th prior draw.
  from sgm_jax.cli.sample import run_sample
  alone = run_sample(_tiny_digits_config(digits_npz), str(workdir), "ddim", 3, 10)
  with np.load(alone["npz"]) as f:
    np.testing.assert_allclose(f["samples"], together, rtol=1e-4, atol=1e-5)


_HOLD_LOCK = """
import os, sys, time
sys.path.insert(0, {root!r})
from sgm_jax import parallel
num_processes, process_id, port, workdir, release = sys.argv[1:]
if int(num_processes) > 1:
  parallel.initialize_distributed(f"127.0.0.1:{{port}}", int(num_processes), int(process_id))
from sgm_jax.workdir import WorkdirError, WorkdirLock
try:
  with WorkdirLock(workdir):
    print("entered", flush=True)
    deadline = time.time() + 120
    while not os.path.exists(release) and time.time() < deadline:
      time.sleep(0.05)
except WorkdirError as e:
  print(f"refused: {{e}}", flush=True)
  sys.exit(2)
"""


def _lock_job(num_processes, workdir, release, log_dir, name):
  port = _free_port()
  code = _HOLD_LOCK.format(root=ROOT)
  procs = []
  for i in range(num_processes):
    out = open(os.path.join(log_dir, f"{name}_{i}.out"), "w")
    err = open(os.path.join(log_dir, f"{name}_{i}.err"), "w")
    procs.append(prewarmed.Popen(
        [sys.executable, "-c", code, str(num_processes), str(i), str(port), str(workdir),
         str(release)], cwd=ROOT, env=_env(1), stdout=out, stderr=err))
  return procs


def test_the_processes_of_one_job_share_the_workdir_and_a_second_job_is_refused(tmp_path):
  workdir, release, logs = tmp_path / "work", tmp_path / "release", tmp_path
  first = _lock_job(2, workdir, release, logs, "first")
  try:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not all(
        "entered" in _log(logs, "first", i, "out") for i in range(2)):
      assert all(p.poll() is None for p in first), [_log(logs, "first", i, "out") for i in (0, 1)]
      time.sleep(0.05)
    second = _lock_job(2, workdir, release, logs, "second")
    alone = _lock_job(1, workdir, release, logs, "alone")
    assert _finish(second + alone, logs, "second") == [2, 2, 2]
    for name, n in (("second", 2), ("alone", 1)):
      for i in range(n):
        assert "refused: workdir" in _log(logs, name, i, "out"), _log(logs, name, i)[-2000:]
    assert "in use by another process (pid" in _log(logs, "alone", 0, "out")
    assert "job of 2 processes" in _log(logs, "alone", 0, "out")
    assert "in use by another job" in _log(logs, "second", 1, "out")
  finally:
    release.touch()
  assert _finish(first, logs, "first") == [0, 0]
