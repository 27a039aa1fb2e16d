"""time_grid=tuned and `--nfe` for small budgets: the grid fitted to the checkpoint is tuned once,
kept in the workdir per checkpoint, and used alike by --mode sample, --mode eval and the Python
API (cli/tuned_grid.py)."""
import json
import os

import jax
import numpy as np
import pytest
import scipy.optimize

import sgm_jax
from sgm_jax.cli import evaluate, tuned_grid
from sgm_jax.cli.sample import run_sample
from sgm_jax.errors import UserError
from sgm_jax.sampling import budget, tuning
from _run_helpers import save_untrained_checkpoints
from test_run_eval import _config as _eval_config, _fake_feature_network

pytestmark = pytest.mark.usefixtures("fast_compiles")
NFE = 5


def _config():
  config = _eval_config()
  config.sampling.tune_warmup, config.sampling.tune_max_evals = 8, 6
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A checkpoint (step 2) of test_run_eval's digits network, saved directly: a grid is tuned to
  whatever parameters a checkpoint holds, so no training step is traced or compiled for it (the
  tune_* fields only matter when sampling)."""
  return save_untrained_checkpoints(str(tmp_path_factory.mktemp("digits")), _config(), (2,))


def _no_tuning(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("tuned again: the workdir's grid was not used")
  monkeypatch.setattr(scipy.optimize, "minimize", fail)


def _cache(workdir):
  with open(os.path.join(workdir, tuned_grid.CACHE_FILE)) as f:
    return json.load(f)


def test_the_small_budgets_ask_for_a_tuned_grid():
  for nfe in (3, 5, 10, 26):  # UniPC up to 26 NFE (README, "Samplers by budget")
    assert dict(budget.table_row(nfe).options)["time_grid"] == tuned_grid.TUNED
  assert "time_grid" not in dict(budget.table_row(27).options)


def test_nfe_samples_on_the_checkpoints_tuned_grid_tuned_once(workdir, monkeypatch):
  config = _config()
  calls, tune = [], tuning.tune_time_grid

  def recorded(*args, **kwargs):
    calls.append((args, kwargs))
    return tune(*args, **kwargs)

  monkeypatch.setattr(tuning, "tune_time_grid", recorded)
  sampled = run_sample(config, workdir, num_samples=4, nfe=NFE)
  assert sampled["sampler"] == "unipc" and sampled["nfe"] == NFE
  grid = sampled["sampler_options"]["time_grid"]
  (args, kwargs), = calls  # the recipe of config.sampling.tune_*, the table row's options
  assert args[0] == "unipc" and args[3] == (8, 8, 8, 1) and args[4] == sampled["num_steps"]
  assert (kwargs["num_warmup"], kwargs["max_evals"]) == (8, 6)
  np.testing.assert_array_equal(jax.random.key_data(kwargs["key"]),
                                jax.random.key_data(jax.random.PRNGKey(1)))
  assert not {"time_grid", "score_scale"} & set(kwargs)  # unscaled, as the row says
  model = sgm_jax.load(workdir, config=config)
  steps = sampled["num_steps"]
  assert os.path.basename(sampled["npz"]).startswith(f"unipc_{steps}steps_time_grid-tuned_")
  entries = list(_cache(workdir).values())
  assert len(entries) == 1 and entries[0]["time_grid"] == grid

  _no_tuning(monkeypatch)
  again = model.sample_with_info(4, nfe=NFE, seed=int(config.seed))  # the Python API: same grid
  assert again.options["time_grid"] == grid
  np.testing.assert_array_equal(again.samples, np.load(sampled["npz"])["samples"])
  explicit = model.sample_with_info(4, "unipc", steps, int(config.seed), score_scale=1.0,
                                    time_grid=grid)
  np.testing.assert_array_equal(explicit.samples, again.samples)


def test_eval_with_nfe_uses_the_same_grid(workdir, monkeypatch):
  config = _config()
  run_sample(config, workdir, num_samples=4, nfe=NFE)  # tunes, unless the test above did
  grid = list(_cache(workdir).values())[0]["time_grid"]
  _no_tuning(monkeypatch)
  _fake_feature_network(monkeypatch)
  config.eval.feature_extractor = "effnet"
  config.eval.enable_sampling = True
  config.eval.num_samples, config.eval.reference_examples = 4, 8
  result = evaluate.run_eval(config, workdir, nfe=NFE)
  assert result["sampler"] == "unipc" and result["sampler_options"]["time_grid"] == grid
  assert "time_grid-tuned" in os.path.basename(result["samples_png"])


def test_another_checkpoint_gets_its_own_grid(workdir):
  config = _config()
  model = sgm_jax.load(workdir, config=config)
  options = dict(time_grid=tuned_grid.TUNED)  # --nfe 5's (kept by the tests above)
  args = ("unipc", NFE, model.sde, model.score_fn, model.example_shape)
  first = tuned_grid.resolve(config, workdir, options, *args, model.step, model.params)
  n = len(_cache(workdir))
  other = jax.tree_util.tree_map(lambda p: p * 1.01, model.params)
  tuned_grid.resolve(config, workdir, options, *args, model.step, other)
  assert len(_cache(workdir)) == n + 1  # other parameters at the same step: tuned anew
  assert len(first["time_grid"]) == NFE + 1 and first["time_grid"][0] == model.sde.T


def test_a_tuned_grid_for_a_stochastic_sampler_is_refused(workdir):
  """The teacher is the probability-flow ODE: a sampler that draws noise has no grid to fit
  to it (pc runs on a grid, so only its randomness tells)."""
  with pytest.raises(UserError, match="'pc' with options .* draws noise"):
    run_sample(_config(), workdir, "pc", 2, 4, time_grid=tuned_grid.TUNED)
  with pytest.raises(UserError, match="'ddim' with options .* draws noise"):
    run_sample(_config(), workdir, "ddim", 2, 4, time_grid=tuned_grid.TUNED, eta=1.0)
