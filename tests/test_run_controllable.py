"""Controllable generation through the config edge and main.py: classifier training (resumable),
class-conditional sampling, inpainting, colorization and interpolation on small local data."""
import importlib
import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from sgm_jax.cli import classifier, controllable, train_classifier
from sgm_jax.cli.sample import run_sample
from sgm_jax.cli.train import run_train
from sgm_jax.checkpoints import CheckpointError, CheckpointStore
from sgm_jax.errors import UserError
from _run_helpers import ROOT, SMALL_DIGITS_FLAGS, main_py, small_digits

sys.path.insert(0, ROOT)

# Compile-heavy, tiny compute: XLA's optimizations off here and in the main.py runs (main_py).
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _config(**data):
  config = small_digits(importlib.import_module("configs.digits").get_config())
  config.training.n_iters = 2
  config.training.batch_size = 8
  config.training.snapshot_freq = 2
  config.sampling.batch_size = 4
  config.classifier.n_iters = 4
  config.classifier.batch_size = 8
  config.classifier.snapshot_freq = 2
  config.classifier.eval_examples = 16
  config.eval.rtol = config.eval.atol = 1e-5
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A digits workdir with a 2-step score model and a 4-step classifier."""
  workdir = str(tmp_path_factory.mktemp("digits"))
  config = _config()
  run_train(config, workdir)
  metrics = train_classifier.run_train_classifier(config, workdir)
  return config, workdir, metrics


def _classifier_params(workdir):
  store = CheckpointStore(os.path.join(workdir, classifier.CLASSIFIER_DIR), keep=2)
  try:
    step = store.latest_step()
    restored = store.periodic.restore(step)
  finally:
    store.close()
  return step, restored["params"]


def test_classifier_training_writes_metrics(trained):
  _, workdir, metrics = trained
  assert metrics["step"] == 4 and metrics["examples"] == 16
  accuracies = [v for k, v in metrics.items() if k.startswith("accuracy_t=")]
  assert len(accuracies) == 5 and all(0.0 <= a <= 1.0 for a in accuracies)
  with open(os.path.join(workdir, "classifier", "metrics.json")) as f:
    assert json.load(f)["step"] == 4


def test_classifier_resume_repeats_the_uninterrupted_run(trained, tmp_path):
  config, workdir, _ = trained
  straight = str(tmp_path / "straight")
  config6 = _config()
  config6.classifier.n_iters = 6
  train_classifier.run_train_classifier(config6, straight)
  # Resume the 4-step run of the fixture to 6 steps in a copy of its classifier folder.
  import shutil
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  train_classifier.run_train_classifier(config6, resumed)
  (s1, p1), (s2, p2) = _classifier_params(straight), _classifier_params(resumed)
  assert s1 == s2 == 6
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
    np.testing.assert_array_equal(a, b)


def test_class_conditional_sampling_cycles_labels(trained):
  config, workdir, _ = trained
  result = run_sample(config, workdir, "deis", 2, 6, class_label="all",
                              classifier_scale=2.0)
  np.testing.assert_array_equal(result["labels"], np.arange(6) % 10)
  assert result["classifier_scale"] == 2.0 and result["classifier_step"] == 4
  assert result["png"].endswith("_classall.png") and os.path.exists(result["png"])
  with np.load(result["npz"]) as f:
    assert f["samples"].shape == (6, 8, 8, 1) and np.all(np.isfinite(f["samples"]))
  plain = run_sample(config, workdir, "deis", 2, 4)
  guided = run_sample(config, workdir, "deis", 2, 4, class_label=3, classifier_scale=5.0)
  with np.load(plain["npz"]) as f, np.load(guided["npz"]) as g:
    assert not np.allclose(f["samples"], g["samples"])  # the classifier gradient is used


def test_classifier_errors(trained, tmp_path):
  config, workdir, _ = trained
  with pytest.raises(ValueError, match=r"--class_label must be an integer in \[0, 10\) or 'all', "
                                       r"got '12'"):
    run_sample(config, workdir, "deis", 2, 2, class_label="12")
  with pytest.raises(CheckpointError, match="train it first with --mode train_classifier"):
    classifier.load_classifier_log_prob(config, str(tmp_path), None, (8, 8, 1))
  bad = _config()
  bad.classifier.num_classes = 5
  with pytest.raises(ValueError, match="labels up to 9, but config.classifier.num_classes = 5"):
    train_classifier.run_train_classifier(bad, str(tmp_path / "bad"))
  toy = importlib.import_module("configs.toy_2d").get_config()
  with pytest.raises(ValueError, match="needs image data"):
    train_classifier.run_train_classifier(toy, str(tmp_path / "toy"))


@pytest.mark.parametrize("method", ["deis", "pc"])
def test_inpaint_keeps_known_pixels(trained, method):
  config, workdir, _ = trained
  result = controllable.run_inpaint(config, workdir, method, 3, 4, mask="center")
  assert result["known_pixel_max_abs_change"] == 0.0 and result["unknown_fraction"] == 0.25
  with np.load(result["npz"]) as f:
    inputs, mask, x = f["inputs"], f["mask"], f["result"]
  assert x.shape == inputs.shape == (4, 8, 8, 1) and np.all(np.isfinite(x))
  np.testing.assert_array_equal(np.where(mask > 0.5, x, 0), np.where(mask > 0.5, inputs, 0))
  assert not np.allclose(x, inputs)  # the hole is filled with something new
  assert Image.open(result["png"]).size[1] > Image.open(result["png"]).size[0] * 0.3  # 3 rows


@pytest.mark.parametrize("name, unknown", [("left", 0.5), ("right", 0.5), ("top", 0.5),
                                           ("bottom", 0.5), ("center", 0.25)])
def test_mask_names(name, unknown):
  mask = controllable.make_mask(name, (8, 8, 1))
  assert mask.shape == (8, 8, 1) and 1.0 - mask.mean() == unknown


def test_mask_from_file_and_bad_names(tmp_path):
  pixels = np.zeros((8, 8), np.uint8)
  pixels[:, :3] = 255
  path = str(tmp_path / "mask.png")
  Image.fromarray(pixels).save(path)
  np.testing.assert_array_equal(controllable.make_mask(path, (8, 8, 1))[..., 0], pixels > 0)
  with pytest.raises(ValueError, match=r"mask file .* is 8x8; the model's images are 16x16"):
    controllable.make_mask(path, (16, 16, 3))
  with pytest.raises(ValueError, match=r"unknown --mask 'middle': use one of \['left'"):
    controllable.make_mask("middle", (8, 8, 1))
  random = controllable.make_mask("random", (64, 64, 1), seed=1)
  assert 0.4 < random.mean() < 0.6


def test_colorize_keeps_gray_values(tmp_path):
  rng = np.random.default_rng(0)
  images = (rng.random((24, 8, 8, 3)) * 255).astype(np.uint8)
  np.savez(tmp_path / "rgb.npz", images=images, labels=np.arange(24) % 3)
  config = _config(dataset="npz", data_dir=str(tmp_path / "rgb.npz"), num_channels=3)
  workdir = str(tmp_path / "wd")
  run_train(config, workdir)
  result = controllable.run_colorize(config, workdir, "deis", 3, 4, input_path=str(tmp_path / "rgb.npz"))
  with np.load(result["npz"]) as f:
    gray, x = f["gray"], f["result"]
  assert x.shape == (4, 8, 8, 3) and np.all(np.isfinite(x))
  tolerance = 1e-6 * max(1.0, float(np.abs(x).max())) * 8  # float32 rounding of the 3x3 transform
  assert result["gray_max_abs_change"] < tolerance
  np.testing.assert_allclose(x.mean(axis=-1, keepdims=True), gray, atol=tolerance)
  assert np.abs(x - x.mean(axis=-1, keepdims=True)).max() > 1e-3  # it is not gray any more
  Image.fromarray(images[0]).save(tmp_path / "photo.png")  # one image: no count needed
  single = controllable.run_colorize(config, workdir, "deis", 3, input_path=str(tmp_path / "photo.png"))
  assert single["num_images"] == 1


@pytest.mark.usefixtures("optimized_compiles")  # its adaptive ODE solves run long
def test_interpolation_from_an_input_file(trained, tmp_path):
  config, workdir, _ = trained
  rng = np.random.default_rng(1)
  np.savez(tmp_path / "in.npz", images=(rng.random((4, 16, 16)) * 255).astype(np.uint8))
  result = controllable.run_interpolate(config, workdir, 2, 5, input_path=str(tmp_path / "in.npz"))
  with np.load(result["npz"]) as f:
    inputs, strips = f["inputs"], f["result"]
  assert inputs.shape == (4, 8, 8, 1)  # resized to the model's 8x8
  assert strips.shape == (2, 5, 8, 8, 1) and np.all(np.isfinite(strips))
  assert result["nfe_per_pair"] > 0 and np.isfinite(result["reconstruction_max_abs_error"])
  assert 0.0 <= result["reconstruction_rms_error"] <= result["reconstruction_max_abs_error"]
  width, height = Image.open(result["png"]).size
  assert width > 2 * height  # 2 rows of 5
  # named by what changes it: another ODE tolerance writes its own files
  assert os.path.basename(result["png"]) == "interpolate_5points_tol1e-05_ckpt2.png"


def test_controllable_outputs_of_other_settings_are_kept(trained, tmp_path):
  config, workdir, _ = trained
  plain = controllable.run_inpaint(config, workdir, "ddim", 2, 1, mask="top")
  scaled = controllable.run_inpaint(config, workdir, "ddim", 2, 1, mask="top", score_scale=1.5)
  assert os.path.basename(plain["png"]) == "inpaint_top_ddim_2steps_ckpt2.png"
  assert os.path.basename(scaled["png"]) == "inpaint_top_ddim_2steps_score_scale-1.5_ckpt2.png"
  with np.load(plain["npz"]) as a, np.load(scaled["npz"]) as b:
    assert not np.array_equal(a["result"], b["result"])  # both kept, each its own


def test_a_single_input_image_needs_no_count(trained, tmp_path):
  config, workdir, _ = trained
  Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "digit.png")
  result = controllable.run_inpaint(config, workdir, "ddim", 2, input_path=str(tmp_path / "digit.png"))
  assert result["num_images"] == 1
  with np.load(result["npz"]) as f:
    assert f["result"].shape == (1, 8, 8, 1)


def test_input_file_errors(trained, tmp_path):
  config, workdir, _ = trained
  with pytest.raises(FileNotFoundError, match="--input file .*nope.npz' not found"):
    controllable.run_inpaint(config, workdir, "deis", 2, 2, input_path=str(tmp_path / "nope.npz"))
  np.savez(tmp_path / "few.npz", images=np.zeros((1, 8, 8), np.uint8))
  with pytest.raises(ValueError, match="needed 2 input images, found 1"):
    controllable.run_inpaint(config, workdir, "deis", 2, 2, input_path=str(tmp_path / "few.npz"))
  (tmp_path / "junk.png").write_bytes(b"not an image")
  with pytest.raises(ValueError, match="neither an .npz nor an image file"):
    controllable.run_inpaint(config, workdir, "deis", 2, 2, input_path=str(tmp_path / "junk.png"))
  with pytest.raises(ValueError, match="colorization needs an RGB model"):
    controllable.run_colorize(config, workdir, "deis", 2, 2)


def test_cli_modes(trained, tmp_path):
  _, workdir, _ = trained
  common = ["--config", "configs/digits.py", "--workdir", workdir,
            "--config.training.batch_size=8", *SMALL_DIGITS_FLAGS, "--num_steps", "2"]
  # The sizes of the tests above (1 image to inpaint, 4 samples), so that main.py finds their
  # programs in the test run's compilation cache.
  res = main_py("--mode", "inpaint", *common, "--num_samples", "1", "--sampler", "ddim",
                "--mask", "top")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "inpaint_top_ddim_2steps_ckpt2.png" in res.stdout
  res = main_py("--mode", "sample", *common, "--num_samples", "4", "--sampler", "deis",
                "--class_label", "7")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "of class 7 (classifier scale 1)" in res.stdout
  # A mode's bad input: exit code 2 and the message (main.py turns a UserError into that)...
  res = main_py("--mode", "colorize", *common, "--num_samples", "2")
  assert res.returncode == 2 and "colorization needs an RGB model" in res.stderr, res.stderr[-2000:]


def test_cli_modes_bad_input_is_a_user_error(trained):
  """...and the other bad inputs of the modes are UserErrors of the functions main.py calls with
  its flags (--mask and --class_label reach them: test_cli_modes), in this process: a main.py run
  each only repeated the exit code that test_cli_modes checks."""
  config, workdir, _ = trained
  with pytest.raises(UserError, match="unknown --mask 'middle'"):
    controllable.run_inpaint(config, workdir, "ddim", 2, 2, mask="middle")
  with pytest.raises(UserError, match="--class_label must be"):
    run_sample(config, workdir, "deis", 2, 2, class_label="x")
