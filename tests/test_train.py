import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import checkpoints, train
import prewarmed
from xla_flags import with_device_count

SCRIPT = os.path.join(os.path.dirname(__file__), "toy_train_run.py")
# XLA's optimizations off in the toy runs: compiling the train step is most of a run's time, and
# the runs a test compares all compile alike (tests/_run_helpers.py does the same for main.py).
FAST_COMPILES = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}


def _run(args, env_extra=None, **kwargs):
  env = dict(os.environ, **FAST_COMPILES, **(env_extra or {}))
  return prewarmed.run([sys.executable, SCRIPT] + [str(a) for a in args], env=env,
                       capture_output=True, text=True, **kwargs)


# toy_train_run.py with its batches(start) wrapped to report the step of every batch handed out.
_COUNTING_RUN = """import sys
sys.path.insert(0, {tests!r})
import toy_train_run as run
plain = run.batches
def batches(start, *args, **kwargs):
  for i, x in enumerate(plain(start, *args, **kwargs)):
    print(f"batch for step {{start + i}}", file=sys.stderr, flush=True)
    yield x
run.batches = batches
sys.exit(run.main(sys.argv[1:]))
"""


def _run_counting_batches(args, **kwargs):
  """_run, and the steps whose batches the run asked for."""
  code = _COUNTING_RUN.format(tests=os.path.dirname(SCRIPT))
  res = prewarmed.run([sys.executable, "-c", code] + [str(a) for a in args], capture_output=True,
                      text=True, env=dict(os.environ, **FAST_COMPILES), **kwargs)
  return res, [int(s) for s in re.findall(r"batch for step (\d+)", res.stderr)]


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
  proc = prewarmed.Popen([sys.executable, SCRIPT, str(work), str(n_iters)],
                         env=dict(os.environ, **FAST_COMPILES), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
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
  store = checkpoints.CheckpointStore(str(work))
  resume_step = store.latest_step()
  store.close()
  assert resume_step is not None and 6 <= resume_step < n_iters, resume_step
  resumed, requested = _run_counting_batches([work, n_iters, "--out", tmp_path / "resumed.npz"],
                                             timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  # Training is deterministic, so a restart from step 0 would end in the same state: what shows a
  # resume is that only the steps after the checkpoint run, on the batches of those steps.
  assert requested == list(range(resume_step, n_iters)), (resume_step, requested)
  for a, b in zip(_load(tmp_path / "ref.npz"), _load(tmp_path / "resumed.npz")):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(_read_log(tmp_path / "ref")[1], _read_log(work)[1])


def test_one_device_and_two_devices_give_the_same_losses(tmp_path):
  """Global batch 8 on one device vs 4 + 4 on two: the same trajectory to float tolerance."""
  out = {}
  for n in (1, 2):
    res = _run([tmp_path / f"dev{n}", 12, "--out", tmp_path / f"dev{n}.npz"],
               env_extra={"XLA_FLAGS": with_device_count(n)}, timeout=600)
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


@pytest.mark.parametrize("torn", ["300,0.2", "300,0.2,", "30", "300,0.1x,0.001\n", "3x,0.2,1e-3\n",
                                  "300,0.25,1e-", "300,0.25,0.001,7\n"])
def test_loss_log_drops_a_torn_last_row_with_a_warning(tmp_path, caplog, torn):
  """A run killed mid-append leaves half a row; the next run's log drops it and stays readable."""
  path = str(tmp_path / "train_log.csv")
  with open(path, "w") as f:
    f.write("step,loss,lr\n100,0.5,0.001\n200,0.25,0.002\n" + torn)
  with caplog.at_level("WARNING"):
    log = train._LossLog(path, resume_step=1000)
  assert "train_log.csv" in caplog.text and "dropping" in caplog.text
  log.append(400, 0.125, 0.003)
  log.close()
  steps, losses = log.read()
  np.testing.assert_array_equal(steps, [100, 200, 400])
  np.testing.assert_array_equal(losses, [0.5, 0.25, 0.125])
  np.testing.assert_array_equal(_read_log(tmp_path)[1], [0.5, 0.25, 0.125])
  with open(path) as f:
    assert f.read() == "step,loss,lr\n100,0.5,0.001\n200,0.25,0.002\n400,0.125,0.003\n"


def test_loss_log_keeps_rows_up_to_the_resume_step_and_writes_whole_rows(tmp_path):
  path = str(tmp_path / "train_log.csv")
  log = train._LossLog(path, resume_step=0)
  writes = []
  real_write = log._file.write
  log._file.write = lambda text: (writes.append(text), real_write(text))[1]
  for step in (50, 100, 150):
    log.append(step, step / 1000, 1e-4)
  log.close()
  assert writes == ["50,0.05,0.0001\n", "100,0.1,0.0001\n", "150,0.15,0.0001\n"]  # one write a row
  resumed = train._LossLog(path, resume_step=100)
  resumed.close()
  np.testing.assert_array_equal(resumed.read()[0], [50, 100])


def test_expected_end_step_is_where_the_time_limit_stops_training():
  end = train._expected_end_step
  # no time limit, or no rate yet: the run goes to n_iters
  assert end(100, 10_000, 1, None, 60.0, 5.0) == 10_000
  assert end(100, 10_000, 1, 900.0, 60.0, 0.0) == 10_000
  # 15 minutes at 5 steps/s, 60 s spent at step 300: 840 s * 5 = 4200 more steps
  assert end(300, 1_000_000, 1, 900.0, 60.0, 5.0) == 4500
  # whole device calls of 4 steps: 4201 steps need 1051 calls
  assert end(300, 1_000_000, 4, 900.0, 60.0, 5.0 + 1 / 840) == 300 + 4 * 1051
  assert end(300, 4000, 1, 900.0, 60.0, 5.0) == 4000  # n_iters comes first
  assert end(300, 4000, 1, 900.0, 900.0, 5.0) == 300  # the time is up: stops here
  assert end(300, 4000, 1, 900.0, 950.0, 5.0) == 300


def test_train_bar_total_follows_the_time_limit(tmp_path, monkeypatch):
  """A run stopped by max_seconds: the bar's total (so its ETA) is the step it stops at."""
  import tqdm
  import optax
  totals, bars = [], []

  class Bar(tqdm.tqdm):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      bars.append(self)

    def update(self, n=1):
      totals.append(self.total)
      return super().update(n)

  monkeypatch.setattr(tqdm, "tqdm", Bar)

  def step_fn(state, batch):
    return state.replace(step=state.step + 1), {"loss": jnp.mean(batch)}

  def batches(start):
    while True:
      time.sleep(0.02)
      yield np.ones((2, 2), np.float32)

  state = train.create_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1))
  spec = train.LoopSpec(n_iters=10 ** 6, batch_size=2, log_freq=1000, max_seconds=1.5)
  final = train.train_loop(str(tmp_path), state, step_fn, batches, spec)
  steps = int(final.step)
  assert 5 < steps < 1000
  assert "1.5" in bars[0].desc or "00:01" in bars[0].desc, bars[0].desc
  assert max(totals[2:]) < 1000  # after a rate is known, never the 10**6 of n_iters
  assert abs(totals[-1] - steps) <= 0.3 * steps, (totals[-5:], steps)
  assert bars[0].total == bars[0].n == steps


def test_steady_clock_stops_before_the_final_checkpoint(tmp_path, monkeypatch):
  """stats' steady time covers the steps, not the checkpoint every run saves at its end (a
  1 GB DDPM++ state takes seconds to write: benchmarks/train.py's loop overhead counted it)."""
  import optax
  from sgm_jax.checkpoints import CheckpointStore
  save = CheckpointStore.save

  def slow_save(self, *args, **kwargs):
    time.sleep(1.0)
    return save(self, *args, **kwargs)

  monkeypatch.setattr(CheckpointStore, "save", slow_save)

  def step_fn(state, batch):
    return state.replace(step=state.step + 1), {"loss": jnp.mean(batch)}

  def batches(start):
    while True:
      yield np.ones((2, 2), np.float32)

  state = train.create_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1))
  stats = {}
  spec = train.LoopSpec(n_iters=20, batch_size=2, log_freq=5)
  assert int(train.train_loop(str(tmp_path), state, step_fn, batches, spec, stats=stats).step) == 20
  assert stats["steady_steps"] == 19  # after the first (compiling) call
  assert stats["steady_seconds"] < 0.9 and stats["final_checkpoint_seconds"] >= 1.0, stats


def test_a_resumed_run_restores_into_an_abstract_state_and_computes_no_fresh_one(tmp_path):
  """run_train's way: the state's shapes, and fresh_state() called only where there is nothing to
  resume (once, by the first run); the second run continues the first one's parameters."""
  import optax
  tx = optax.sgd(0.1)

  def step_fn(state, batch):
    params = jax.tree_util.tree_map(lambda w: w + jnp.mean(batch), state.params)
    return state.replace(step=state.step + 1, params=params), {"loss": jnp.mean(batch)}

  def batches(start):
    while True:
      yield np.ones((2, 2), np.float32)

  fresh = []

  def fresh_state():
    fresh.append(True)
    return train.create_train_state({"w": jnp.full(3, 5.0)}, tx)

  abstract = jax.eval_shape(lambda: train.create_train_state({"w": jnp.zeros(3)}, tx))
  spec = train.LoopSpec(n_iters=4, batch_size=2, log_freq=2)
  first = train.train_loop(str(tmp_path), abstract, step_fn, batches, spec,
                           fresh_state=fresh_state)
  assert len(fresh) == 1 and int(first.step) == 4
  np.testing.assert_array_equal(first.params["w"], np.full(3, 9.0, np.float32))
  spec = train.LoopSpec(n_iters=6, batch_size=2, log_freq=2)
  second = train.train_loop(str(tmp_path), abstract, step_fn, batches, spec,
                            fresh_state=fresh_state)
  assert len(fresh) == 1 and int(second.step) == 6  # resumed at step 4, nothing fresh computed
  np.testing.assert_array_equal(second.params["w"], np.full(3, 11.0, np.float32))
