import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import checkpoints, train

SCRIPT = os.path.join(os.path.dirname(__file__), "toy_train_run.py")


def _run(args, env_extra=None, **kwargs):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run([sys.executable, SCRIPT] + [str(a) for a in args], env=env,
                        capture_output=True, text=True, **kwargs)


def _load(path):
  with np.load(path) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def _read_log(workdir):
  rows = np.genfromtxt(os.path.join(workdir, "train_log.csv"), delimiter=",", names=True)
  return rows["step"], rows["loss"]


def test_checkpoint_round_trip(tmp_path):
  opt = train.OptimizerSpec(warmup=3)
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  state = train.create_train_state(params, opt.build())
  state = state.replace(step=jnp.asarray(7, jnp.int32),
                        params_ema={"w": jnp.full((2, 3), 0.5), "b": jnp.zeros(3)})
  store = checkpoints.CheckpointStore(str(tmp_path), keep=2)
  store.save(7, state)
  restored = checkpoints.CheckpointStore(str(tmp_path)).restore(
      train.create_train_state(params, opt.build()))
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(a, b)
  assert int(restored.step) == 7
  store.close()


def test_keep_n_and_newest_of_snapshot_or_periodic(tmp_path):
  store = checkpoints.CheckpointStore(str(tmp_path), keep=2)
  state = {"x": np.zeros(2)}
  for s in (10, 20, 30):
    store.save(s, {"x": np.full(2, s)}, kind="periodic")
  store.save(35, {"x": np.full(2, 35)}, kind="snapshot")
  assert sorted(store.periodic.all_steps()) == [20, 30]
  assert store.latest_step() == 35
  np.testing.assert_array_equal(store.restore(state)["x"], [35, 35])
  np.testing.assert_array_equal(store.restore(state, step=20)["x"], [20, 20])
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint for step 5"):
    store.restore(state, step=5)
  store.close()


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
  store = checkpoints.CheckpointStore(str(tmp_path), keep=2)
  store.save(3, {"x": np.arange(4.0)})
  for root, _, files in os.walk(tmp_path / "checkpoints" / "3"):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
  with pytest.raises(checkpoints.CheckpointError, match="could not be read"):
    checkpoints.CheckpointStore(str(tmp_path)).restore({"x": np.zeros(4)})


def test_killed_and_resumed_training_is_bit_identical(tmp_path):
  n_iters = 24
  ref = _run([tmp_path / "ref", n_iters, "--out", tmp_path / "ref.npz"], timeout=600)
  assert ref.returncode == 0, ref.stderr[-2000:]
  # Kill -9 once a snapshot exists, at a point that differs from the checkpoint steps.
  work = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, SCRIPT, str(work), str(n_iters)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    meta = work / "checkpoints-meta"
    if meta.exists() and any(p.name.isdigit() and int(p.name) >= 6 for p in meta.iterdir()):
      break
    time.sleep(0.05)
  killed_early = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert killed_early, "training finished before it could be killed"
  resumed = _run([work, n_iters, "--out", tmp_path / "resumed.npz"], timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step" in resumed.stderr or checkpoints.CheckpointStore(str(work)).latest_step()
  for a, b in zip(_load(tmp_path / "ref.npz"), _load(tmp_path / "resumed.npz")):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(_read_log(tmp_path / "ref")[1], _read_log(work)[1])


def test_one_device_and_two_devices_give_the_same_losses(tmp_path):
  """Global batch 8 on one device vs 4 + 4 on two: the same trajectory to float tolerance."""
  out = {}
  for n in (1, 2):
    res = _run([tmp_path / f"dev{n}", 12, "--out", tmp_path / f"dev{n}.npz"],
               env_extra={"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"devices: {n}" in res.stdout
    out[n] = _read_log(tmp_path / f"dev{n}")[1]
  assert len(out[1]) == 12
  np.testing.assert_allclose(out[1], out[2], rtol=1e-5)
  for a, b in zip(_load(tmp_path / "dev1.npz"), _load(tmp_path / "dev2.npz")):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nan_in_a_batch_stops_training_and_keeps_the_last_checkpoint(tmp_path):
  res = _run([tmp_path, 24, "--nan_at", 9], timeout=600)
  assert res.returncode != 0
  assert "training loss became nan at step 9" in res.stderr
  assert "last good checkpoint (step 8)" in res.stderr
  store = checkpoints.CheckpointStore(str(tmp_path))
  assert store.latest_step() == 8
  store.close()
