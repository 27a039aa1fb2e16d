"""--mode eval and the sampler options of the command line: the config's PC settings survive a
single --sampler_option, eval computes what config.eval enables (the test loss too) or says that
nothing is enabled, checks its sizes before any work, saves its progress per batch, and its
bits/dim program equals a direct computation."""
import importlib
import json
import os
import sys

import numpy as np
import pytest

from sgm_jax.cli import evaluate, outputs, setup
from sgm_jax.cli.sample import run_sample
from sgm_jax.cli.train import run_train
from sgm_jax.errors import UserError
from _run_helpers import ROOT, SMALL_DIGITS_FLAGS, main_py, small_digits

sys.path.insert(0, ROOT)

# Compile-heavy, tiny compute: XLA's optimizations off here and in the main.py runs (main_py).
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _config():
  config = small_digits(importlib.import_module("configs.digits").get_config())
  config.training.n_iters = 2
  config.training.batch_size = 4
  config.training.snapshot_freq = 2
  config.sampling.batch_size = 4
  config.eval.batch_size = 4
  config.eval.enable_loss = False
  config.eval.enable_bpd = False
  config.eval.enable_denoising_error = False
  config.eval.enable_sampling = False
  return config


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("digits"))
  run_train(_config(), workdir)
  return workdir


def test_one_sampler_option_keeps_the_configs_other_pc_settings():
  config = _config()
  config.sampling.predictor, config.sampling.snr = "euler_maruyama", 0.07
  options = setup.sampler_options_from_config(config, "pc", {"n_steps_each": 2})
  assert options == dict(predictor="euler_maruyama", corrector=config.sampling.corrector,
                         snr=0.07, n_steps_each=2, denoise=config.sampling.noise_removal,
                         probability_flow=config.sampling.probability_flow)
  assert setup.sampler_options_from_config(config, "deis", {"order": 2}) == {"order": 2}


def test_the_configs_score_scale_reaches_every_sampler_and_one_means_none():
  config = _config()
  config.sampling.score_scale = 1.02
  assert setup.sampler_options_from_config(config, "deis", {}) == {"score_scale": 1.02}
  assert setup.sampler_options_from_config(config, "pc", {})["score_scale"] == 1.02
  # --sampler_option score_scale=1 turns it off: the options (and names of cached runs) of
  # an unscaled sampler
  assert setup.sampler_options_from_config(config, "deis", {"score_scale": 1}) == {}
  config.sampling.score_scale = 1.0
  assert setup.sampler_options_from_config(config, "deis", {"order": 2}) == {"order": 2}


def test_sample_and_eval_use_the_same_sampler_settings(digits_workdir, monkeypatch):
  _fake_feature_network(monkeypatch)  # the settings are compared, not the features' numbers
  config = _config()
  config.eval.feature_extractor = "effnet"  # the stand-in's name
  config.sampling.snr = 0.05
  config.eval.enable_sampling = True
  config.eval.sampler, config.eval.num_steps, config.eval.num_samples = "pc", 2, 4
  config.eval.reference_examples = 8
  sampled = run_sample(config, digits_workdir, "pc", 2, 4, denoise=False)
  evaluated = evaluate.run_eval(config, digits_workdir, denoise=False)
  assert sampled["sampler_options"]["snr"] == 0.05 and sampled["sampler_options"]["denoise"] is False
  assert evaluated["sampler_options"] == sampled["sampler_options"]
  # Eval draws its own keys, so the settings are compared, and the nfe they imply: 2 steps of
  # predictor + corrector, no final denoising step.
  assert evaluated["nfe"] == sampled["nfe"] == 4


def test_eval_loss_is_the_test_mean_without_padding(digits_workdir):
  config = _config()
  config.eval.enable_loss = True
  config.eval.loss_num_examples = 10 ** 6
  result = evaluate.run_eval(config, digits_workdir)
  assert result["loss_examples"] == 179  # the digits test split; 179 = 44 * 4 + 3 (one padded)
  assert np.isfinite(result["loss"]) and result["loss"] > 0
  again = evaluate.run_eval(config, digits_workdir)  # resumed from the per-batch files
  assert again["loss"] == result["loss"]
  files = sorted(os.listdir(os.path.join(digits_workdir, "eval", "ckpt_2", "loss_test")))
  assert len(files) == 45 and files[0] == "batch_000000.npz"


def test_eval_with_nothing_enabled_says_so_and_writes_nothing(digits_workdir):
  with pytest.raises(UserError, match="nothing to compute.*eval.enable_loss"):
    evaluate.run_eval(_config(), digits_workdir)
  results = os.path.join(digits_workdir, "eval", "results.jsonl")
  before = open(results).read() if os.path.exists(results) else ""
  with pytest.raises(UserError):
    evaluate.run_eval(_config(), digits_workdir)
  assert (open(results).read() if os.path.exists(results) else "") == before


@pytest.mark.parametrize("extractor,images", [("effnet", "1618 images of the train split"),
                                               ("domain", "179 images of the test split")])
def test_eval_sizes_are_checked_before_any_work(digits_workdir, extractor, images):
  config = _config()
  config.eval.enable_sampling = True
  config.eval.feature_extractor = extractor  # its reference: the training split, or the test split
  config.eval.reference_examples = 2048
  with pytest.raises(UserError, match=rf"eval.reference_examples=2048 is more than the {images}"):
    evaluate.run_eval(config, digits_workdir)
  ckpt_dir = os.path.join(digits_workdir, "eval", "ckpt_2")
  assert not any(name.startswith("samples_deis_10")
                 for name in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []))


def test_shipped_digits_config_fits_its_data():
  from sgm_jax import datasets
  config = importlib.import_module("configs.digits").get_config()
  dataset = datasets.get_dataset(datasets.from_config(config))
  parts = evaluate.eval_parts(config, images=True)
  evaluate.check_eval_sizes(config, dataset, parts)  # raises if the defaults ask for too much


def test_cli_reads_python_booleans_and_refuses_unclear_ones(digits_workdir):
  common = ["--mode", "sample", "--config", "configs/digits.py", "--workdir", digits_workdir,
            "--config.training.batch_size=4", *SMALL_DIGITS_FLAGS, "--sampler", "pc",
            "--num_steps", "2", "--num_samples", "2"]
  res = main_py(*common, "--sampler_option", "denoise=False")
  assert res.returncode == 0, res.stderr[-2000:]
  assert "(4 score evaluations per batch)" in res.stdout  # 2 x (predictor + corrector), no denoise
  res = main_py(*common, "--sampler_option", "denoise=maybe")
  assert res.returncode == 2 and "denoise must be true or false, got 'maybe'" in res.stderr
  assert "Traceback" not in res.stderr


def test_score_sde_cifar10_configs_evaluate_the_test_loss():
  """score_sde's CIFAR-10 defaults turn sampling and bits/dim off and the eval loss on."""
  for name in ("vp_cifar10", "ve.cifar10_ncsnpp_continuous"):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert evaluate.eval_parts(config, images=True) == ["loss"]


@pytest.mark.parametrize("option", ["denoise", "probability_flow"])
def test_pc_refuses_a_boolean_option_given_as_a_string(option):
  from sgm_jax import sampling, sde_lib
  with pytest.raises(UserError, match=f"{option} must be true or false, got 'False'"):
    sampling.get_sampler("pc", sde_lib.VPSDE(), (2, 2), num_steps=2, **{option: "False"})


def test_a_damaged_progress_file_is_recomputed_not_fatal(tmp_path):
  progress = outputs.BatchProgress(str(tmp_path))
  progress.add(0, loss=1.0)
  progress.add(1, loss=2.0)
  path = tmp_path / "batch_000001.npz"
  path.write_bytes(path.read_bytes()[:40])  # a truncated zip
  again = outputs.BatchProgress(str(tmp_path))
  assert sorted(again.done) == [0] and float(again.gather("loss")[0]) == 1.0


def test_the_eval_bits_per_dim_program_equals_a_direct_computation(digits_workdir):
  """bpd_batch_fn (what --mode eval runs on every device) gives, on one device, the bits/dim of
  likelihood.bits_per_dim with the config's ODE settings and the batch key folded with device 0."""
  import jax
  from sgm_jax import likelihood, parallel
  config = _config()
  # 1e-4: at 1e-3 the two programs' roundings of the small network drift 1.6e-5 apart (2e-6 here)
  with config.unlocked():
    config.eval.update(divergence="rademacher", num_probes=2, rtol=1e-4, atol=1e-4,
                       likelihood_eps=1e-4)
  trained = setup.restore_trained(config, digits_workdir)
  x01 = (np.random.RandomState(0).randint(0, 17, (4, 8, 8, 1)) / 16.0).astype(np.float32)
  key = jax.random.PRNGKey(3)
  bpd, nfe = parallel.gather(evaluate.bpd_batch_fn(config, trained.sde)(
      (parallel.replicate(trained.score_fn), parallel.replicate(key)),
      parallel.from_global_batch(x01)))
  ev = config.eval
  ll_fn = likelihood.get_likelihood_fn(trained.sde, divergence=ev.divergence,
                                       num_probes=ev.num_probes, rtol=ev.rtol, atol=ev.atol,
                                       eps=ev.likelihood_eps)
  expected, expected_nfe = likelihood.bits_per_dim(
      jax.random.fold_in(key, 0), ll_fn, trained.score_fn, x01, bool(config.data.centered))
  np.testing.assert_allclose(np.asarray(bpd), np.asarray(expected), rtol=1e-5)
  assert float(np.asarray(nfe)[0]) == float(expected_nfe)


def _fake_feature_network(monkeypatch):
  """EfficientNet would cost a minute on CPU: features are the means of the image's quadrants."""
  import jax
  from sgm_jax.evaluation import features

  def extractor(name, weights_path=None, *args, **kwargs):
    def network(variables, x):
      h, w = x.shape[1] // 2, x.shape[2] // 2
      f = jax.numpy.stack([x[:, i:i + h, j:j + w].mean(axis=(1, 2, 3))
                           for i in (0, h) for j in (0, w)], axis=-1)
      return f, 10.0 * f[:, :3]
    return features.FeatureExtractor(name, features.METRIC_NAMES[name], 4, 3, 8, 64, "fake",
                                     lambda images: np.asarray(images, np.float32),
                                     jax.jit(network), None)
  monkeypatch.setattr(features, "get_feature_extractor", extractor)
  monkeypatch.setattr(features, "resolve_weights", lambda name, path=None: "fake")


def _checkpoints_of(workdir, new_workdir):
  import shutil
  shutil.copytree(workdir, new_workdir, ignore=shutil.ignore_patterns("eval", "samples"))
  return str(new_workdir)


def test_eval_with_another_seed_gives_that_seeds_numbers(digits_workdir, tmp_path, monkeypatch):
  """Seed 42 then 43 in one workdir (over a checkpoint range, so the stored summary is checked
  too): the second evaluation reuses none of seed 42's batches or summary and reports what seed 43
  gives in a fresh workdir; the results rows name their seeds."""
  _fake_feature_network(monkeypatch)
  shared = _checkpoints_of(digits_workdir, tmp_path / "shared")
  fresh = _checkpoints_of(digits_workdir, tmp_path / "fresh")
  config = _config()
  config.eval.feature_extractor = "effnet"  # the stand-in's name
  config.eval.enable_sampling = True
  config.eval.sampler, config.eval.num_steps, config.eval.num_samples = "deis", 2, 8
  config.eval.reference_examples = 8
  config.eval.begin_ckpt = config.eval.end_ckpt = 1  # step 2
  first = evaluate.run_eval(config, shared)
  config.seed = 43
  second = evaluate.run_eval(config, shared)
  alone = evaluate.run_eval(config, fresh)
  assert (first["seed"], second["seed"], alone["seed"]) == (42, 43, 43)
  assert second["FD-EffNet"] == pytest.approx(alone["FD-EffNet"], rel=1e-6)
  assert second["FD-EffNet"] != pytest.approx(first["FD-EffNet"], rel=1e-3)
  rows = [json.loads(line) for line in open(os.path.join(shared, "eval", "results.jsonl"))]
  assert [row["seed"] for row in rows] == [42, 43]
  assert evaluate.run_eval(config, shared)["FD-EffNet"] == second["FD-EffNet"]  # summary reused
  assert len(open(os.path.join(shared, "eval", "results.jsonl")).readlines()) == 2


def test_eval_with_a_budget_samples_within_it(digits_workdir, monkeypatch):
  """nfe=5 without a sampler: the budget table's sampler in 5 evaluations, and the row says so
  (a named sampler's steps: tests/test_sampling_budget.py, the same resolution)."""
  from sgm_jax.sampling import budget
  _fake_feature_network(monkeypatch)
  config = _config()
  config.eval.feature_extractor = "effnet"  # the stand-in's name
  config.eval.enable_sampling = True
  config.eval.num_samples, config.eval.reference_examples = 4, 8
  config.sampling.tune_warmup, config.sampling.tune_max_evals = 8, 4  # the row's tuned grid
  result = evaluate.run_eval(config, digits_workdir, nfe=5)
  assert (result["sampler"], result["num_steps"], result["nfe"]) == (
      budget.table_row(5).sampler, 5, 5.0)
  with pytest.raises(UserError, match="not both"):
    evaluate.run_eval(config, digits_workdir, num_steps=3, nfe=5)


def test_sample_file_names_say_what_changes_the_samples():
  stem = outputs.sample_file_stem
  assert stem("ddim", 3, {}, 2) == "ddim_3steps_ckpt2"
  assert stem("deis", 10, {"score_scale": 1.5, "order": 2}, 7) == \
      "deis_10steps_order-2_score_scale-1.5_ckpt7"
  # the adaptive ODE by its solver and tolerances, not by the steps it does not use
  assert stem("ode", 1, {}, 2) == "ode_dopri5_tol1e-05_ckpt2"
  assert stem("ode", 1, {"solver": "tsit5", "rtol": 1e-3}, 2) == \
      "ode_tsit5_rtol0.001_atol1e-05_ckpt2"
  assert stem("ode", 4, {"solver": "heun"}, 2) == "ode_heun_4steps_ckpt2"
  # and main.py's line says so too, not "in 1 steps"
  assert outputs.steps_phrase("ode", 1, {}) == \
      "by dopri5 with adaptive steps (rtol 1e-05, atol 1e-05)"
  assert outputs.steps_phrase("ode", 4, {"solver": "heun"}) == "in 4 steps"
  assert outputs.steps_phrase("deis", 10, {}) == "in 10 steps"
  # pc: the config's predictor-corrector fields at pc's defaults are left out
  config_pc = dict(predictor="reverse_diffusion", corrector="langevin", snr=0.16, n_steps_each=1,
                   denoise=True, probability_flow=False)
  assert stem("pc", 500, config_pc, 2) == "pc_500steps_denoise_ckpt2"
  assert stem("pc", 500, dict(config_pc, snr=0.1, denoise=False), 2) == \
      "pc_500steps_snr-0.1_ckpt2"  # (denoise=False: pc's default)
  assert stem("pc", 500, dict(config_pc, variant="score_sde"), 2) == "pc_score_sde_500steps_ckpt2"
  # values that are no short text: a digest, the same for the same value
  grid = stem("deis", 3, {"time_grid": [1.0, 0.5, 1e-3]}, 2)
  assert grid == stem("deis", 3, {"time_grid": (1.0, 0.5, 0.001)}, 2)
  assert grid != stem("deis", 3, {"time_grid": [1.0, 0.4, 1e-3]}, 2)
  assert "/" not in stem("deis", 3, {"time_grid": "../x"}, 2)


def test_sample_files_of_other_options_or_seeds_are_never_overwritten(digits_workdir, tmp_path):
  workdir = _checkpoints_of(digits_workdir, tmp_path / "wd")
  config = _config()
  plain = run_sample(config, workdir, "deis", 2, 2)
  scaled = run_sample(config, workdir, "deis", 2, 2, score_scale=1.5)
  assert os.path.basename(plain["npz"]) == "deis_2steps_ckpt2.npz"
  assert os.path.basename(scaled["npz"]) == "deis_2steps_score_scale-1.5_ckpt2.npz"
  with np.load(plain["npz"]) as f:
    plain_samples = f["samples"]
  again = run_sample(config, workdir, "deis", 2, 2)  # the same settings: its own files, replaced
  assert again["npz"] == plain["npz"]
  config.seed = 43  # another seed: the name of seed 42's samples is taken, they are kept
  other = run_sample(config, workdir, "deis", 2, 2)
  assert other["npz"] != plain["npz"] and other["npz"].startswith(plain["npz"][:-4] + "_")
  assert os.path.exists(other["png"])
  with np.load(plain["npz"]) as f, np.load(other["npz"]) as g:
    np.testing.assert_array_equal(f["samples"], plain_samples)
    assert not np.array_equal(g["samples"], plain_samples)
  assert run_sample(config, workdir, "deis", 2, 2)["npz"] == other["npz"]
  assert len(os.listdir(os.path.join(workdir, "samples"))) == 6  # 3 runs: .npz and .png each
