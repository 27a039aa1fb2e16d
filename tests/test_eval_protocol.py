"""score_sde's evaluation protocol: uint8 samples before the feature network, statistics of the
whole training split or of a published statistics file (score_sde, pytorch-fid, EDM layouts), one
Inception Score split, the loop over eval.begin_ckpt..end_ckpt, the CIFAR-10 configs, and
score_sde's resizing of CelebA / LSUN (checked against Pillow's float resampling, an independent
implementation of the same antialiased filters)."""
import importlib
import json
import os
import pickle
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from sgm_jax.cli import evaluate
from sgm_jax.datasets import image_ops
from sgm_jax.errors import UserError
from sgm_jax.evaluation import features, metrics, statistics_files
from _run_helpers import compiles_so_far, save_untrained_checkpoints, small_digits

# Tiny programs: XLA's optimizations only cost compile time here.
pytestmark = pytest.mark.usefixtures("fast_compiles")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# --- published statistics files -----------------------------------------------------------------


def _features(n=40, d=5, seed=0):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_score_sde_stats_file_gives_the_mean_and_covariance_of_its_pool_3(tmp_path):
  pool = _features()
  path = tmp_path / "cifar10_stats.npz"
  np.savez(path, pool_3=pool, logits=_features(40, 7, seed=1))
  stats = statistics_files.load_reference_statistics(str(path))
  np.testing.assert_allclose(stats.mean, pool.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.cov, np.cov(pool.astype(np.float64), rowvar=False),
                             rtol=1e-10)
  assert stats.count == 40 and stats.features.shape == (40, 5)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pytorch_fid_and_edm_files_npz_and_pickle(tmp_path, protocol):
  mu, sigma = _features(1, 4)[0].astype(np.float64), np.cov(_features(30, 4), rowvar=False)
  np.savez(tmp_path / "fid_stats.npz", mu=mu, sigma=sigma)
  with open(tmp_path / "edm_ref.pkl", "wb") as f:
    pickle.dump({"mu": mu, "sigma": sigma}, f, protocol=protocol)
  for name in ("fid_stats.npz", "edm_ref.pkl"):
    stats = statistics_files.load_reference_statistics(str(tmp_path / name))
    np.testing.assert_array_equal(stats.mean, mu)
    np.testing.assert_array_equal(stats.cov, sigma)


def test_this_projects_cache_layout_is_read_too(tmp_path):
  cov = np.cov(_features(30, 3), rowvar=False)
  np.savez(tmp_path / "cache.npz", mean=np.ones(3), cov=cov, count=np.asarray(30))
  stats = statistics_files.load_reference_statistics(str(tmp_path / "cache.npz"))
  np.testing.assert_array_equal(stats.cov, cov)
  assert stats.features is None
  kept = _features(30, 3)
  np.savez(tmp_path / "cache.npz", mean=np.ones(3), cov=cov, features=kept)  # for KID
  stats = statistics_files.load_reference_statistics(str(tmp_path / "cache.npz"))
  np.testing.assert_array_equal(stats.features, kept)


def test_unknown_or_broken_statistics_files_name_what_they_hold(tmp_path):
  np.savez(tmp_path / "odd.npz", means=np.zeros(3), covs=np.eye(3))
  with pytest.raises(UserError, match=r"keys \['covs', 'means'\].*'pool_3'.*'mu'"):
    statistics_files.load_reference_statistics(str(tmp_path / "odd.npz"))
  np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(4))
  with pytest.raises(UserError, match=r"\(3,\) and covariance of shape \(4, 4\)"):
    statistics_files.load_reference_statistics(str(tmp_path / "bad.npz"))
  with pytest.raises(UserError, match="does not exist"):
    statistics_files.load_reference_statistics(str(tmp_path / "missing.npz"))


class _RunsCode:
  def __reduce__(self):
    return (os.mkdir, (_RunsCode.target,))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
  _RunsCode.target = str(tmp_path / "made_by_the_pickle")
  with open(tmp_path / "evil.pkl", "wb") as f:
    pickle.dump({"mu": _RunsCode()}, f)
  with pytest.raises(UserError, match="refusing to load posix.mkdir|refusing to load os.mkdir"):
    statistics_files.load_reference_statistics(str(tmp_path / "evil.pkl"))
  assert not os.path.exists(_RunsCode.target)


# --- score_sde's quantization and the protocol's fields ------------------------------------------


def test_quantize_samples_truncates_and_clips_as_score_sde():
  x = np.array([0.0, 3 / 255 - 1e-6, 3 / 255 + 1e-6, 0.999, 1.0, 1.5, -0.2], np.float32)
  q = features.quantize_samples(x)
  assert q.dtype == np.uint8
  np.testing.assert_array_equal(q, [0, 2, 3, 254, 255, 255, 0])


def _config(name="digits"):
  # The digits Mixer at one narrow block: the protocol does not depend on the network, and its
  # samplers and losses compile in about half the time.
  config = small_digits(importlib.import_module(f"configs.{name}").get_config())
  config.training.batch_size = 4
  config.sampling.batch_size = 4
  # The batches of the reference features (the 1618 training images: 102 calls, not 405; the
  # last of 2 images, a power of two, so the fake network sees no padding) and of the test loss;
  # the sample batches are config.sampling's.
  config.eval.batch_size = 16
  for part in ("loss", "bpd", "denoising_error", "sampling"):
    config.eval[f"enable_{part}"] = False
  return config


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_cifar10_configs_evaluate_50000_samples_with_score_sdes_protocol():
  from ml_collections import config_flags
  from absl import flags
  configs = [f"{d}.{f[:-3]}" for d in ("ve", "vp", "subvp", "ve.ncsn", "ve.ncsnv2", "vp.ddpm")
             for f in os.listdir(os.path.join(ROOT, "configs", *d.split(".")))
             if f.startswith("cifar10") and f.endswith(".py")]
  assert len(configs) >= 15
  for name in configs:
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.eval.num_samples == 50000, name
    protocol = evaluate.sample_protocol(config)
    assert (protocol.name, protocol.feature_extractor, protocol.quantize_samples,
            protocol.reference_examples, protocol.inception_score_splits) == (
                "score_sde", "inception", True, None, 1), name
    assert (protocol.sampler, protocol.num_steps) == (config.sampling.method,
                                                      config.model.num_scales)
  # The protocol's fields are placeholders: the command line can set each one.
  argv = ["prog", "--config", os.path.join(ROOT, "configs", "vp_cifar10.py"),
          "--config.eval.reference_examples=5000", "--config.eval.quantize_samples=False",
          "--config.eval.reference_statistics=cifar10_stats.npz"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  protocol = evaluate.sample_protocol(values.config)
  assert (protocol.reference_examples, protocol.quantize_samples, protocol.feature_extractor,
          protocol.reference_statistics) == (5000, False, "inception", "cifar10_stats.npz")


def test_protocol_fields_are_checked():
  config = _config()
  config.eval.protocol = "tf-gan"
  with pytest.raises(UserError, match=r"eval.protocol 'tf-gan'.*\['score_sde', 'sgm_jax'\]"):
    evaluate.sample_protocol(config)
  config = _config()
  config.eval.reference_examples = -1
  with pytest.raises(UserError, match="reference_examples must be >= 0"):
    evaluate.sample_protocol(config)


# --- evaluation of a tiny trained model -----------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Checkpoints of steps 2, 4 and 6 (score_sde's checkpoints 1, 2 and 3 at snapshot_freq 2) of
  the digits network, saved directly (no training step is compiled): the initial state with its
  EMA parameters scaled by 1, 1.1 and 1.2, so that each checkpoint gives other numbers."""
  return save_untrained_checkpoints(str(tmp_path_factory.mktemp("digits_ckpts")), _config(),
                                    (2, 4, 6), ema_scales=(1.0, 1.1, 1.2))


def _fake_outputs(x, xp=np):
  """The fake network: features are the channel means, logits three other statistics."""
  m, s = x.mean(axis=(1, 2, 3)), x.std(axis=(1, 2, 3))
  return x.mean(axis=(1, 2)), 10.0 * xp.stack([m, m * m, s], axis=-1)


def _as_unit(batch):
  """What the fake's preprocessing makes of a recorded batch: [0, 1] floats, RGB."""
  x = batch.astype(np.float64) / (255.0 if batch.dtype == np.uint8 else 1.0)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


class _Recorder:
  """A fake feature extractor (_fake_outputs) that keeps the images it is given."""

  def __init__(self):
    self.inputs = []

  def extractor(self, name, weights_path=None, *args, **kwargs):
    def network(variables, x):
      del variables
      return _fake_outputs(x, jax.numpy)

    def preprocess(images):
      self.inputs.append(np.asarray(images))
      return _as_unit(np.asarray(images)).astype(np.float32)
    return features.FeatureExtractor(name, features.METRIC_NAMES[name], 3, 3, 8, 64,
                                     f"fake-{name}", preprocess, jax.jit(network), None)


def _sampling_config(protocol):
  config = _config()
  config.eval.protocol = protocol
  config.eval.enable_sampling = True
  config.eval.sampler, config.eval.num_steps, config.eval.num_samples = "deis", 2, 6
  config.eval.reference_examples = None if protocol == "score_sde" else 8
  config.eval.feature_extractor = None
  return config


@pytest.mark.parametrize("protocol", ["score_sde", "sgm_jax"])
def test_samples_are_quantized_only_under_score_sdes_protocol(workdir, monkeypatch, protocol):
  recorder = _Recorder()
  monkeypatch.setattr(features, "get_feature_extractor", recorder.extractor)
  monkeypatch.setattr(features, "resolve_weights", lambda name, path=None: "fake")
  result = evaluate.evaluate_checkpoint(_sampling_config(protocol), workdir, 6)
  name = "inception" if protocol == "score_sde" else "effnet"
  reference = recorder.inputs[:-2]  # then two sample batches of 4 (6 samples)
  samples = recorder.inputs[-2:]
  assert all(batch.dtype == np.float32 for batch in reference)
  scoring = f"{name}_uint8" if protocol == "score_sde" else name
  first = np.load(os.path.join(workdir, "eval", "ckpt_6", f"samples_deis_2_{scoring}",
                               "batch_000000.npz"))["first"]
  if protocol == "score_sde":
    assert samples[0].dtype == np.uint8
    np.testing.assert_array_equal(samples[0], np.clip(first * 255, 0, 255).astype(np.uint8))
    assert result["reference_examples"] == 1618  # the whole digits training split
    assert sum(len(b) for b in reference) == 1618
  else:
    assert samples[0].dtype == np.float32
    np.testing.assert_array_equal(samples[0], first)
    assert result["reference_examples"] == 8
  # Inception Score over one split (score_sde) or ten (at most one per sample here).
  _, logits = _fake_outputs(np.concatenate([_as_unit(s) for s in samples])[:6])
  splits = 1 if protocol == "score_sde" else 6
  expected, _ = metrics.inception_score(metrics.softmax(logits), splits)
  assert result[f"IS ({name})"] == pytest.approx(expected, rel=1e-5)
  assert result["protocol"] == protocol and result["quantized_samples"] == (
      protocol == "score_sde")


def test_a_statistics_file_replaces_the_training_split(workdir, monkeypatch, tmp_path):
  recorder = _Recorder()
  monkeypatch.setattr(features, "get_feature_extractor", recorder.extractor)
  monkeypatch.setattr(features, "resolve_weights", lambda name, path=None: "fake")
  pool = np.random.default_rng(3).uniform(0, 1, (50, 3)).astype(np.float32)
  np.savez(tmp_path / "digits_stats.npz", pool_3=pool)
  config = _sampling_config("score_sde")
  config.eval.reference_statistics = str(tmp_path / "digits_stats.npz")
  result = evaluate.evaluate_checkpoint(config, workdir, 4)  # (6's samples are on disk)
  assert len(recorder.inputs) == 2  # the samples only: no training image was read
  sample_features, _ = _fake_outputs(np.concatenate([_as_unit(s) for s in recorder.inputs])[:6])
  expected = metrics.frechet_distance(*metrics.gaussian_statistics(sample_features),
                                      *metrics.gaussian_statistics(pool.astype(np.float64)))
  assert result["FID"] == pytest.approx(expected, rel=1e-4)
  assert result["reference"] == str(tmp_path / "digits_stats.npz")
  np.savez(tmp_path / "wide_stats.npz", pool_3=np.zeros((4, 2048), np.float32))
  config.eval.reference_statistics = str(tmp_path / "wide_stats.npz")
  with pytest.raises(UserError, match="holds 2048-d features, but eval.feature_extractor"):
    evaluate.evaluate_checkpoint(config, workdir, 4)


def _stored_sample_features(workdir, step):
  """The sample features an evaluation of checkpoint `step` left in its per-batch files."""
  folder = os.path.join(workdir, "eval", f"ckpt_{step}", "samples_deis_2_inception_uint8")
  return np.concatenate([np.load(os.path.join(folder, f))["features"]
                         for f in sorted(os.listdir(folder)) if f.startswith("batch_")])


def test_kid_is_tfgans_block_kid_of_the_samples_and_the_training_features(workdir, monkeypatch):
  import shutil
  for folder in ("stats", "ckpt_2"):  # nothing cached: every feature passes the recorder
    shutil.rmtree(os.path.join(workdir, "eval", folder), ignore_errors=True)
  recorder = _Recorder()
  monkeypatch.setattr(features, "get_feature_extractor", recorder.extractor)
  monkeypatch.setattr(features, "resolve_weights", lambda name, path=None: "fake")
  result = evaluate.evaluate_checkpoint(_sampling_config("score_sde"), workdir, 2)
  reference = [b for b in recorder.inputs if b.dtype == np.float32]  # training images
  samples = [b for b in recorder.inputs if b.dtype == np.uint8]  # score_sde's quantized samples
  ref_features, _ = _fake_outputs(np.concatenate([_as_unit(b) for b in reference]))
  sample_features, _ = _fake_outputs(np.concatenate([_as_unit(b) for b in samples])[:6])
  assert ref_features.shape == (1618, 3)  # the whole digits training split
  # 1618 rows: two blocks, of 809 training images and of 3 samples each
  kid, stderr = metrics.kernel_inception_distance_blocks(ref_features, sample_features)
  assert result["KID (inception)"] == pytest.approx(kid, rel=1e-4, abs=1e-7)
  assert result["KID (inception) stderr"] == pytest.approx(stderr, rel=1e-4, abs=1e-7)
  assert result["kid_reference_examples"] == 1618 and "KID (inception) unavailable" not in result

  # Resumed from the per-batch sample files and the cached statistics: the same KID, nothing
  # passes the feature network again.
  recorder.inputs.clear()
  again = evaluate.evaluate_checkpoint(_sampling_config("score_sde"), workdir, 2)
  assert recorder.inputs == []
  assert (again["KID (inception)"], again["FID"]) == (result["KID (inception)"], result["FID"])

  # A cache of format 1 (mean and covariance, no features) is recomputed, never a crash.
  (cache,) = [os.path.join(workdir, "eval", "stats", f)
              for f in os.listdir(os.path.join(workdir, "eval", "stats"))]
  with np.load(cache) as data:
    old = {k: data[k] for k in data.files if k not in ("features", "kept_features")}
  np.savez(cache, **dict(old, format=np.asarray(1)))
  recomputed = evaluate.evaluate_checkpoint(_sampling_config("score_sde"), workdir, 2)
  assert sum(len(b) for b in recorder.inputs) == 1618
  assert recomputed["KID (inception)"] == result["KID (inception)"]

  # Only the first features.REFERENCE_FEATURES training images are kept for KID; FID uses all.
  monkeypatch.setattr(features, "REFERENCE_FEATURES", 101)  # not a whole batch
  capped = evaluate.evaluate_checkpoint(_sampling_config("score_sde"), workdir, 2)
  assert capped["kid_reference_examples"] == 101 and capped["reference_examples"] == 1618
  kid_101, _ = metrics.kernel_inception_distance_blocks(ref_features[:101], sample_features)
  assert capped["KID (inception)"] == pytest.approx(kid_101, rel=1e-4, abs=1e-7)
  assert capped["FID"] == pytest.approx(result["FID"], rel=1e-6)


def test_kid_from_a_pool_3_file_and_none_from_a_mean_and_covariance_file(workdir, monkeypatch,
                                                                          tmp_path, caplog):
  recorder = _Recorder()
  monkeypatch.setattr(features, "get_feature_extractor", recorder.extractor)
  monkeypatch.setattr(features, "resolve_weights", lambda name, path=None: "fake")
  pool = np.random.default_rng(4).uniform(0, 1, (50, 3)).astype(np.float32)
  np.savez(tmp_path / "digits_stats.npz", pool_3=pool)
  config = _sampling_config("score_sde")
  config.eval.reference_statistics = str(tmp_path / "digits_stats.npz")
  result = evaluate.evaluate_checkpoint(config, workdir, 2)
  sample_features = _stored_sample_features(workdir, 2)[:6]
  kid, _ = metrics.kernel_inception_distance_blocks(pool, sample_features)
  assert result["KID (inception)"] == pytest.approx(kid, rel=1e-4, abs=1e-7)
  assert result["KID (inception) stderr"] is None  # one block: no standard error
  assert result["kid_reference_examples"] == 50

  mu, sigma = metrics.gaussian_statistics(pool)
  np.savez(tmp_path / "fid_stats.npz", mu=mu, sigma=sigma)  # pytorch-fid's layout
  config.eval.reference_statistics = str(tmp_path / "fid_stats.npz")
  with caplog.at_level("WARNING"):
    for _ in range(2):
      no_kid = evaluate.evaluate_checkpoint(config, workdir, 2)
      assert no_kid["KID (inception)"] is None
      assert no_kid["FID"] == pytest.approx(result["FID"], rel=1e-6)  # FID still computed
  why = no_kid["KID (inception) unavailable"]
  assert "fid_stats.npz hold a mean and covariance only, no features" in why
  logged = [r.getMessage() for r in caplog.records
            if "KID (inception) not computed" in r.getMessage()]
  assert len(logged) == 1 and why in logged[0]  # once, not once per evaluation
  line = json.loads(open(os.path.join(workdir, "eval", "results.jsonl")).read().splitlines()[-1])
  assert line["KID (inception)"] is None and line["KID (inception) unavailable"] == why


def test_a_summary_of_an_earlier_format_is_made_again(tmp_path):
  settings = evaluate._settings(_config(), None, None, None, {})
  os.makedirs(tmp_path / "eval" / "ckpt_2")
  for stored, reused in ((settings, True), (dict(settings, summary_format=1), False)):
    with open(tmp_path / "eval" / "ckpt_2" / "result.json", "w") as f:
      json.dump(dict(result={"FID": 1.0}, settings=stored), f)  # a summary made without KID
    assert (evaluate._finished_summary(str(tmp_path), 2, settings) is not None) == reused


def _loop_config():
  config = _sampling_config("sgm_jax")
  config.eval.num_samples = 4
  config.training.snapshot_freq = 2
  config.eval.enable_loss = True
  config.eval.loss_num_examples = 8
  config.eval.begin_ckpt, config.eval.end_ckpt = 1, 4  # steps 2..8; 8 does not exist
  return config


def test_the_checkpoint_loop_evaluates_each_existing_checkpoint_once(workdir, monkeypatch):
  compiles, evaluate_checkpoint = [], evaluate.evaluate_checkpoint

  def counted(*args, **kwargs):  # the XLA compiles of each checkpoint's evaluation
    before = compiles_so_far()
    summary = evaluate_checkpoint(*args, **kwargs)
    compiles.append(compiles_so_far() - before)
    return summary
  monkeypatch.setattr(evaluate, "evaluate_checkpoint", counted)
  monkeypatch.setattr(features, "get_feature_extractor", _Recorder().extractor)
  monkeypatch.setattr(features, "resolve_weights", lambda name, path=None: "fake")
  result = evaluate.run_eval(_loop_config(), workdir)
  steps = [r["checkpoint_step"] for r in result["checkpoints"]]
  assert steps == [2, 4, 6] and result["checkpoint_step"] == 6
  # checkpoints 4 and 6 run the programs compiled for checkpoint 2 (the loss and the sampler)
  assert compiles[0] > 0 and compiles[1:] == [0, 0], compiles
  fds = [r["FD-EffNet"] for r in result["checkpoints"]]  # the fake features
  assert len(set(fds)) == 3 and all(np.isfinite(fds))  # samples of three parameter sets
  losses = [r["loss"] for r in result["checkpoints"]]
  assert len(set(losses)) == 3 and all(np.isfinite(losses))  # three different parameter sets
  results_file = os.path.join(workdir, "eval", "results.jsonl")
  lines = open(results_file).read().splitlines()

  evaluated = []

  def spy(config, workdir, step, *args, **kwargs):  # records what would be evaluated
    evaluated.append(step)
    return dict(checkpoint_step=step)
  monkeypatch.setattr(evaluate, "evaluate_checkpoint", spy)
  again = evaluate.run_eval(_loop_config(), workdir)
  assert evaluated == [] and [r["loss"] for r in again["checkpoints"]] == losses
  assert open(results_file).read().splitlines() == lines  # nothing evaluated, nothing appended

  os.remove(os.path.join(workdir, "eval", "ckpt_4", "result.json"))  # interrupted before the end
  config = _loop_config()
  config.eval.end_ckpt = 2  # the range is not a setting: checkpoint 2 stays done
  evaluate.run_eval(config, workdir)
  assert evaluated == [4]
  config.eval.loss_num_examples = 4  # another setting: every checkpoint again
  evaluate.run_eval(config, workdir)
  assert evaluated == [4, 2, 4]


def test_a_range_without_checkpoints_names_the_steps_there_are(workdir):
  config = _loop_config()
  config.eval.begin_ckpt, config.eval.end_ckpt = 9, 26
  with pytest.raises(UserError, match=r"steps 18..52 at training.snapshot_freq=2.*\[2, 4, 6\]"):
    evaluate.run_eval(config, workdir)
  config.eval.begin_ckpt = 30
  with pytest.raises(UserError, match="0 <= begin_ckpt <= end_ckpt, got 30 and 26"):
    evaluate.run_eval(config, workdir)


# --- score_sde's resizing -------------------------------------------------------------------------


def _pillow_resize(image: np.ndarray, height: int, width: int, method) -> np.ndarray:
  """Pillow's float ('F' mode) resampling, channel by channel."""
  return np.stack([np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F")
                              .resize((width, height), method)) for c in range(image.shape[-1])],
                  axis=-1)


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_celeba_is_cropped_to_140_and_resized_bilinear_without_rounding():
  image = _image(218, 178)
  out = image_ops.score_sde_fit(image, "celeba", 64, 3)
  crop = image[39:179, 19:159]  # score_sde's central_crop(img, 140)
  expected = _pillow_resize(crop, 64, 64, Image.Resampling.BILINEAR)
  assert out.dtype == np.float32 and out.shape == (64, 64, 3)
  np.testing.assert_allclose(out, expected, rtol=0, atol=2e-4)
  assert np.abs(out - np.rint(out)).max() > 0.1  # not re-quantized


def test_lsun_128_resizes_the_shorter_side_then_crops():
  image = _image(256, 341, seed=1)  # 341 * 128 / 256 = 170.5: rounded half to even, as tf.round
  out = image_ops.score_sde_fit(image, "lsun", 128, 3)
  width = round(341 * 128 / 256)
  assert width == 170
  small = _pillow_resize(image, 128, width, Image.Resampling.BILINEAR)
  np.testing.assert_allclose(out, small[:, 21:149], rtol=0, atol=2e-4)


def test_lsun_256_is_cropped_and_resized_bicubic_then_truncated():
  image = _image(300, 320, seed=2)
  out = image_ops.score_sde_fit(image, "lsun", 256, 3)
  expected = _pillow_resize(image[:, 10:310], 256, 256, Image.Resampling.BICUBIC)
  assert out.dtype == np.uint8
  interior = np.abs(expected - np.rint(expected)) > 1e-3  # away from float ties at integers
  truncated = np.clip(expected, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(out[interior], truncated[interior])
  square = _image(256, 300, seed=3)
  np.testing.assert_array_equal(image_ops.score_sde_fit(square, "lsun", 256, 3),
                                square[:, 22:278])


def test_cifar10_at_its_own_size_is_untouched_and_otherwise_bilinear():
  image = _image(32, 32, seed=4)
  assert image_ops.score_sde_fit(image, "cifar10", 32, 3) is image
  np.testing.assert_allclose(image_ops.score_sde_fit(image, "cifar10", 20, 3),
                             _pillow_resize(image, 20, 20, Image.Resampling.BILINEAR),
                             rtol=0, atol=2e-4)
  with pytest.raises(UserError, match="no fitting for dataset 'mnist'"):
    image_ops.score_sde_fit(image, "mnist", 32, 3)
