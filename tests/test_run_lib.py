"""End to end through the config edge: every small config trains a real step on local data and
samples; main.py gives one clear error and a non-zero exit for bad input."""
import dataclasses
import functools
import importlib
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import datasets, models, train
from sgm_jax.cli import setup
from sgm_jax.cli.evaluate import run_eval
from sgm_jax.cli.sample import run_sample
from sgm_jax.cli.train import run_train
from sgm_jax.errors import UserError
from sgm_jax.evaluation import domain
from sgm_jax.sampling import budget
from sgm_jax.workdir import WorkdirError, WorkdirLock
from _run_helpers import FAST_COMPILES, ROOT, main_py, small_digits
import prewarmed

sys.path.insert(0, ROOT)

# Compile-heavy, tiny compute: XLA's optimizations off here and in the main.py runs (main_py).
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _config(name, **overrides):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.training.n_iters = 2
  config.training.batch_size = 4
  config.training.log_freq = 1
  config.training.snapshot_freq = 2
  config.training.snapshot_freq_for_preemption = 1
  config.sampling.batch_size = 4
  config.sampling.num_samples = 4
  for key, value in overrides.items():
    section, field = key.split(".")
    setattr(getattr(config, section), field, value)
  return config


def _available(name):
  try:
    datasets.get_dataset(datasets.from_config(_config(name))).train_batch(0)
    return True
  except (datasets.DatasetNotFoundError, datasets.MissingDependencyError, ImportError):
    return False


# Narrower layers of the same networks: a config's data, network, loss and sampler are what is
# run; the widths only cost time (test_create_model_contract builds fashion_mnist's at its own).
NARROW = {"digits": {"model.hidden_size": 16, "model.mix_patch_size": 32,
                     "model.mix_hidden_size": 32},
          "fashion_mnist": {"model.channels": (8, 16, 32, 64), "model.embed_dim": 32},
          "mnist5k": {"model.channels": (8, 16, 32, 64), "model.embed_dim": 32}}


@pytest.mark.parametrize("name", ["toy_2d", "digits", "fashion_mnist", "mnist5k"])
def test_small_config_trains_and_samples(name, tmp_path):
  if not _available(name):
    pytest.skip(f"the local data of configs/{name}.py is not installed (see README)")
  config = _config(name, **NARROW.get(name, {}))
  workdir = str(tmp_path)
  state = run_train(config, workdir)
  assert int(state.step) == 2
  for leaf in jax.tree_util.tree_leaves(state.params_ema):
    assert np.all(np.isfinite(leaf))
  assert os.path.exists(os.path.join(workdir, "loss_curve.png"))
  result = run_sample(config, workdir, "deis", num_steps=2, num_samples=3)
  assert result["checkpoint_step"] == 2 and result["nfe"] == 2
  with np.load(result["npz"]) as f:
    samples = f["samples"]
  assert samples.shape[0] == 3 and np.all(np.isfinite(samples))
  assert os.path.getsize(result["png"]) > 0


def test_training_resumes_instead_of_restarting(tmp_path, monkeypatch):
  """Training is deterministic, so a restart would end in the same state as a resume: what shows
  the resume is which steps run, counted from the batches that train_loop asks for."""
  requested = []
  plain_loop = train.train_loop

  def counting_loop(workdir, state, step_fn, batches, *args, **kwargs):
    def counted(start):
      for i, batch in enumerate(batches(start)):
        requested.append(start + i)
        yield batch
    return plain_loop(workdir, state, step_fn, counted, *args, **kwargs)

  monkeypatch.setattr(train, "train_loop", counting_loop)
  config = _config("toy_2d")
  run_train(config, str(tmp_path))
  assert requested == [0, 1]
  requested.clear()
  config.training.n_iters = 3
  state = run_train(config, str(tmp_path))
  assert int(state.step) == 3
  assert requested == [2]  # only the step after the checkpoint of step 2


def test_workdir_of_another_config_is_refused_and_kept(tmp_path):
  run_train(_config("toy_2d"), str(tmp_path))
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  other = _config("toy_2d")
  other.model.hidden = (64, 64)
  with pytest.raises(WorkdirError, match=r"belongs to a different config \(model.hidden"):
    run_train(other, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_second_process_on_the_same_workdir_is_refused(tmp_path):
  with WorkdirLock(str(tmp_path)):
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from sgm_jax.workdir import WorkdirLock\n"
            "with WorkdirLock(%r): pass\n") % (ROOT, str(tmp_path))
    # main.py's environment: the warm interpreter of its runs serves this one too
    res = prewarmed.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=dict(os.environ, **FAST_COMPILES))
  assert res.returncode != 0 and "is in use by another process" in res.stderr
  with WorkdirLock(str(tmp_path)):  # released again
    pass


@pytest.mark.parametrize("config_file", ["configs/ve/cifar10_ncsnpp_continuous.py",
                                         "configs/vp/ddpm/cifar10.py", "configs/ve/ncsnv2/cifar10.py",
                                         "configs/fashion_mnist.py"])
def test_create_model_contract(config_file):
  """models.create_model(config, sde); model.init({'params', 'dropout'}, x, t) with float (B,) t."""
  module = config_file[:-3].replace("/", ".")
  config = importlib.import_module(module).get_config()
  model = models.create_model(config, setup.sde_from_config(config))
  size, channels = config.data.image_size, config.data.num_channels
  x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  key = jax.random.PRNGKey(0)
  variables = jax.eval_shape(lambda x, t: model.init({"params": key, "dropout": key}, x, t), x, t)
  n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))
  assert n > 10_000


@pytest.fixture(scope="module")
def cli_trained(tmp_path_factory):
  """A toy_2d workdir trained for 2 steps by `main.py --mode train`, and that run's result."""
  wd = str(tmp_path_factory.mktemp("cli") / "wd")
  res = main_py("--mode", "train", "--config", "configs/toy_2d.py", "--workdir", wd,
                "--config.training.n_iters=2", "--config.training.snapshot_freq=2",
                "--config.training.snapshot_freq_for_preemption=1")
  return wd, res


def test_cli_train_and_sample(cli_trained):
  wd, res = cli_trained
  common = ["--config", "configs/toy_2d.py", "--workdir", wd]
  assert res.returncode == 0, res.stderr[-3000:]
  assert "trained to step 2" in res.stdout
  res = main_py("--mode", "sample", *common, "--sampler", "ddim", "--num_steps", "3",
                "--num_samples", "8", "--sampler_option", "eta=0.5")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "8 samples" in res.stdout and os.path.exists(os.path.join(wd, "samples",
                                                                   "ddim_3steps_eta-0.5_ckpt2.png"))
  res = main_py("--mode", "sample", *common, "--nfe", "7", "--num_samples", "4",  # the table's pick
                "--config.sampling.tune_warmup=8", "--config.sampling.tune_max_evals=4")
  assert res.returncode == 0, res.stderr[-3000:]
  row = budget.table_row(7)
  assert f"by {row.sampler} in 7 steps (7 score evaluations per batch)" in res.stdout
  assert "tune_time_grid unipc, 7 steps" in res.stdout  # tuned for this checkpoint, then kept
  assert os.path.exists(os.path.join(wd, "samples",
                                     f"{row.sampler}_7steps_time_grid-tuned_ckpt2.png"))
  assert os.path.exists(os.path.join(wd, "tuned_grids.json"))


# main.py's own part of a bad input: a --config override of a missing field (its flag parser), and
# a UserError of the mode's function as the message and a non-zero exit. The other bad values are
# UserErrors of the function that main.py calls with its flags, checked in this process below (a
# main.py run each, ~2 s of imports, only repeated the exit code).
@pytest.mark.parametrize("args, message", [
    (["--config.training.sde=vpsd"], "unknown SDE 'vpsd'"),
    (["--config.training.nonsense=1"], "nonsense"),
])
def test_cli_bad_training_input(tmp_path, args, message):
  res = main_py("--mode", "train", "--config", "configs/toy_2d.py", "--workdir", str(tmp_path),
                *args)
  assert res.returncode != 0
  assert message in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("field, value, message", [
    ("model.name", "unet", "unknown model 'unet'"),
    ("data.dataset", "cifar11", "cifar11"),
    ("training.n_iters", 0, "training.n_iters must be a positive integer, got 0"),
])
def test_bad_training_input_is_a_user_error(tmp_path, field, value, message):
  """What `main.py --mode train --config configs/toy_2d.py --config.<field>=<value>` runs."""
  config = importlib.import_module("configs.toy_2d").get_config()
  section, name = field.split(".")
  setattr(getattr(config, section), name, value)
  with pytest.raises(UserError, match=re.escape(message)):
    run_train(config, str(tmp_path))


def test_cli_bad_sampling_input(cli_trained):
  wd, res = cli_trained  # a workdir with a checkpoint: the errors are the sampler's, not its
  assert res.returncode == 0, res.stderr[-2000:]
  # --sampler_option parsed by main.py into the sampler's options; a bad one: message, exit code
  res = main_py("--mode", "sample", "--config", "configs/toy_2d.py", "--workdir", wd,
                "--sampler", "pc", "--sampler_option", "predictor=foo")
  assert res.returncode != 0 and "unknown predictor 'foo'" in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (dict(sampler_name="deiss"), "unknown sampler 'deiss'"),
    (dict(sampler_name="pc", predictor="foo"), "unknown predictor 'foo'"),
    (dict(sampler_name="deis", num_steps=0), "num_steps must be a positive"),
    (dict(sampler_name="pc", corrector="bar"), "unknown corrector 'bar'"),
    (dict(nfe=2), "nfe=2 is below the smallest budget"),
    (dict(nfe=5, num_steps=3), "not both"),
])
def test_bad_sampling_input_is_a_user_error(cli_trained, args, message):
  """What `main.py --mode sample --config configs/toy_2d.py` runs with --sampler, --num_steps,
  --nfe and --sampler_option KEY=VALUE (the flags it leaves out are None)."""
  wd, res = cli_trained
  assert res.returncode == 0, res.stderr[-2000:]
  config = importlib.import_module("configs.toy_2d").get_config()
  with pytest.raises(UserError, match=re.escape(message)):
    run_sample(config, wd, **args)


def test_eval_writes_metrics_and_resumes_without_redoing_batches(tmp_path, monkeypatch):
  # Small networks, a loose bits/dim ODE and a domain classifier of one epoch at a third of the
  # widths: what is checked is which metrics eval writes and that a second run reuses them.
  config = small_digits(_config("digits"))
  config.eval.rtol = config.eval.atol = 1e-2
  small_domain = dataclasses.replace(domain.RECIPE, widths=(8, 16, 16), feature_dim=32, epochs=1)
  monkeypatch.setattr(domain, "get_domain_extractor",
                      functools.partial(domain.get_domain_extractor, recipe=small_domain))
  config.eval.num_samples = 8
  config.eval.reference_examples = 16
  config.eval.bpd_num_examples = 8
  config.eval.loss_num_examples = 8
  config.eval.batch_size = 4
  config.eval.num_steps = 2
  config.eval.denoising_examples = 8  # not asserted here: its default 179 x 1618 only cost time
  config.eval.denoising_reference = 16
  run_train(config, str(tmp_path))
  first = run_eval(config, str(tmp_path))
  assert np.isfinite(first["bpd"]) and first["bpd_examples"] == 8
  assert np.isfinite(first["FD-Domain"]) and first["num_samples"] == 8
  assert 0 <= first["precision (domain)"] <= 1 and 0 <= first["recall (domain)"] <= 1
  progress = sorted((tmp_path / "eval" / "ckpt_2").rglob("batch_*.npz"))
  assert len(progress) == 2 + 2 + 2  # test loss, bits/dim and samples: 8 each in batches of 4
  assert np.isfinite(first["loss"]) and first["loss_examples"] == 8
  stamps = [p.stat().st_mtime_ns for p in progress]
  second = run_eval(config, str(tmp_path))
  assert [p.stat().st_mtime_ns for p in progress] == stamps  # nothing recomputed
  assert second["bpd"] == first["bpd"] and second["FD-Domain"] == first["FD-Domain"]
  assert np.isfinite(first["KID (domain)"]) and second["KID (domain)"] == first["KID (domain)"]
  assert second["precision (domain)"] == first["precision (domain)"]
  lines = (tmp_path / "eval" / "results.jsonl").read_text().strip().splitlines()
  assert len(lines) == 2
