"""Faults and bad input: samplers stay finite at extreme step counts, and every user mistake
gives one clear error, a non-zero exit, and leaves the workdir as it was."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import sampling, sde_lib, toy
import prewarmed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDES = [sde_lib.VESDE(), sde_lib.VPSDE(), sde_lib.subVPSDE()]
FIXED_STEP_SAMPLERS = sorted(set(sampling.SAMPLERS) - {"ode"})

# Compile-heavy, tiny compute (16 two-dimensional points, the toy_2d MLP): XLA's optimizations
# off here and in the main.py runs (env below).
pytestmark = pytest.mark.usefixtures("fast_compiles")
FAST_COMPILES = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}


@pytest.fixture(scope="module")
def oracle():
  return toy.GaussianMixture.create(jnp.array([[-1.0, 0.5], [1.0, -0.5]]), 0.1)


@pytest.mark.parametrize("sde", SDES, ids=[type(s).__name__ for s in SDES])
@pytest.mark.parametrize("name", FIXED_STEP_SAMPLERS)
def test_samplers_stay_finite_for_1_2_and_1000_steps_in_float32(oracle, sde, name):
  # The three samplers, each called as users call it, in one jitted program: one XLA compile
  # instead of three (25-35% less CPU; compiling, not running, is the cost here).
  steps_list, score_fn = (1, 2, 1000), oracle.score_fn(sde)
  samplers = [sampling.get_sampler(name, sde, (16, 2), num_steps=steps) for steps in steps_list]
  outs = jax.jit(lambda: [sampler(jax.random.PRNGKey(steps), score_fn)
                          for sampler, steps in zip(samplers, steps_list)])()
  for steps, (x, nfe) in zip(steps_list, outs):
    assert x.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(x))), (name, steps)
    assert int(nfe) >= 1


@pytest.mark.parametrize("sde", SDES, ids=[type(s).__name__ for s in SDES])
def test_adaptive_ode_sampler_is_finite(oracle, sde):
  x, nfe = sampling.get_sampler("ode", sde, (16, 2), num_steps=1)(jax.random.PRNGKey(0),
                                                                  oracle.score_fn(sde))
  assert bool(jnp.all(jnp.isfinite(x))) and int(nfe) > 6


def _main(*args, env=None):
  return prewarmed.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, **FAST_COMPILES, **(env or {})))


def _snapshot(path):
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      if name == ".lock":  # holds the pid of the last process that took the lock
        continue
      p = os.path.join(root, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, path)] = f.read()
  return out


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A toy_2d workdir trained for 2 steps: what `main.py --mode train --config configs/toy_2d.py
  --config.training.n_iters=2 --config.training.snapshot_freq=2` writes (the same run_train, here
  in this process: the tests are about the runs on it)."""
  import importlib
  from sgm_jax.cli.train import run_train
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  config = importlib.import_module("configs.toy_2d").get_config()
  config.training.n_iters = 2
  config.training.snapshot_freq = 2
  wd = str(tmp_path_factory.mktemp("trained"))
  assert int(run_train(config, wd).step) == 2
  return wd


@pytest.mark.parametrize("args, env, message", [
    (["--mode", "train", "--config", "configs/digits.py", "--config.data.image_size=6"], None,
     "image size 6x6 is not divisible by patch_size=4"),
    (["--mode", "train", "--config", "configs/fashion_mnist.py",
      "--config.data.data_dir=/nonexistent"], None, "apt-get install dataset-fashion-mnist"),
    (["--mode", "train", "--config", "configs/toy_2d.py", "--config.training.batch_size=-4"], None,
     "training.batch_size must be a positive integer, got -4"),
    (["--mode", "sample", "--config", "configs/toy_2d.py"], None, "no checkpoint in"),
])
def test_bad_input_fails_cleanly_in_a_new_workdir(tmp_path, args, env, message):
  res = _main(*args, "--workdir", str(tmp_path / "wd"), env=env)
  assert res.returncode != 0
  assert message in res.stderr, res.stderr[-2000:]
  assert "Traceback" not in res.stderr
  assert not os.path.exists(tmp_path / "wd" / "config.json")  # the workdir stays usable


def test_bad_input_leaves_a_trained_workdir_untouched(trained_workdir, tmp_path):
  import importlib
  from sgm_jax.cli.sample import run_sample
  from sgm_jax.errors import UserError
  before = _snapshot(trained_workdir)
  common = ["--config", "configs/toy_2d.py", "--workdir", trained_workdir]
  junk = tmp_path / "inception.npz"
  junk.write_bytes(b"not an npz file at all")
  res = _main(*common, "--mode", "train", "--config.model.hidden=(64,)")
  assert res.returncode != 0 and "belongs to a different config" in res.stderr, res.stderr[-2000:]
  # The bad sampling inputs as UserErrors (main.py's exit code 2) of run_sample, what
  # `main.py --mode sample` calls with --sampler, --checkpoint_step and --sampler_option, in this
  # process: a main.py run each (~2.3 s of imports) only repeated the exit code checked above.
  config = importlib.import_module("configs.toy_2d").get_config()
  for kwargs, message in [
      (dict(sampler_name="nope"), "unknown sampler 'nope'"),
      (dict(checkpoint_step=7), "no checkpoint for step 7"),
      (dict(sampler_name="ode", solver="rk45"), "unknown solver 'rk45'"),
  ]:
    with pytest.raises(UserError, match=re.escape(message)):
      run_sample(config, trained_workdir, **kwargs)
  assert _snapshot(trained_workdir) == before


def test_corrupt_checkpoint_gives_a_clear_error(trained_workdir, tmp_path):
  import shutil
  wd = str(tmp_path / "copy")
  shutil.copytree(trained_workdir, wd)
  for root, _, files in os.walk(os.path.join(wd, "checkpoints")):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  res = _main("--mode", "sample", "--config", "configs/toy_2d.py", "--workdir", wd)
  assert res.returncode != 0
  assert "could not be read" in res.stderr or "corrupt" in res.stderr, res.stderr[-2000:]


def test_weights_file_that_is_not_what_it_claims(tmp_path):
  from sgm_jax.evaluation import features
  junk = tmp_path / "inception_fid.npz"
  np.savez(junk, something=np.zeros(3))
  with pytest.raises(ValueError, match="not an FID Inception weights file"):
    features.get_feature_extractor("inception", str(junk))
  with pytest.raises(FileNotFoundError, match="--convert"):
    features.get_feature_extractor("inception", str(tmp_path / "missing.npz"))


def test_evaluation_killed_mid_way_resumes_from_its_last_batch(trained_workdir, tmp_path):
  """kill -9 of --mode eval after a few finished batches: the rerun keeps those files, computes
  only the rest, and reports what an uninterrupted evaluation reports."""
  import glob
  import signal
  import time
  wd = str(tmp_path / "wd")
  shutil.copytree(trained_workdir, wd)
  evaluate = ["--mode", "eval", "--config", "configs/toy_2d.py", "--workdir", wd,
              "--config.eval.batch_size=4", "--config.eval.loss_num_examples=2000"]
  pattern = os.path.join(wd, "eval", "ckpt_2", "loss_test", "batch_*.npz")
  proc = prewarmed.Popen([sys.executable, os.path.join(ROOT, "main.py"), *evaluate], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, **FAST_COMPILES))
  deadline = time.time() + 300
  while len(glob.glob(pattern)) < 5 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = {p: os.stat(p).st_mtime_ns for p in glob.glob(pattern)}
  assert 5 <= len(done) < 500, len(done)  # killed mid-way (500 batches of 4 test points)
  res = _main(*evaluate)
  assert res.returncode == 0, res.stderr[-2000:]
  assert all(os.stat(p).st_mtime_ns == t for p, t in done.items())  # not recomputed
  assert len(glob.glob(pattern)) == 500
  resumed = json.loads(open(os.path.join(wd, "eval", "results.jsonl")).read().splitlines()[-1])
  shutil.rmtree(os.path.join(wd, "eval"))
  res = _main(*evaluate)
  assert res.returncode == 0, res.stderr[-2000:]
  whole = json.loads(open(os.path.join(wd, "eval", "results.jsonl")).read().splitlines()[-1])
  assert resumed["loss"] == whole["loss"] and resumed["loss_examples"] == 2000
