"""The domain feature network (sgm_jax/evaluation/domain.py) and improved precision/recall
(metrics.precision_recall): exact against brute force, trained on scikit-learn's 8x8 digits."""
import dataclasses
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from sgm_jax import datasets
from sgm_jax.errors import InputError
from sgm_jax.evaluation import domain, metrics

# A few seconds on the digits' 1,618 training images: 91 % test accuracy (179 images) measured.
TINY = dataclasses.replace(domain.RECIPE, widths=(8, 16, 16), feature_dim=32, epochs=4,
                           batch_size=32, learning_rate=3e-3)
MIN_DIGITS_ACCURACY = 0.8  # chance is 0.1


# --- precision and recall ----------------------------------------------------------------------


def brute_force_precision_recall(real, fake, k):
  """The paper's definition, O(n^2) memory: every pairwise distance at once."""
  def knn_radius(x):
    return np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1), axis=1)[:, k]  # [:, 0]: self
  cross = np.linalg.norm(real[:, None] - fake[None], axis=-1)
  precision = (cross <= knn_radius(real)[:, None]).any(axis=0).mean()
  recall = (cross <= knn_radius(fake)[None, :]).any(axis=1).mean()
  return float(precision), float(recall)


@pytest.mark.parametrize("seed,k,block_size", [(0, 1, 1024), (1, 3, 7), (2, 5, 16), (3, 3, 1)])
def test_precision_recall_equals_brute_force(seed, k, block_size):
  rng = np.random.default_rng(seed)
  real = rng.normal(size=(70, 6))
  fake = 0.8 * rng.normal(size=(45, 6)) + 0.7
  expected = brute_force_precision_recall(real, fake, k)
  assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # the comparison is not trivial
  assert metrics.precision_recall(real, fake, k=k, block_size=block_size) == expected


def test_precision_recall_of_identical_and_of_far_apart_sets():
  x = np.random.default_rng(0).normal(size=(100, 8))
  assert metrics.precision_recall(x, x.copy()) == (1.0, 1.0)
  assert metrics.precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_a_ball_holds_its_boundary():
  """Integer points, so the distances are exact: 4 lies on the k=1 ball of 3 (radius 1)."""
  line = np.arange(4.0)[:, None]  # 0, 1, 2, 3: every k=1 radius is 1
  far = np.array([[4.0], [10.0]])  # radii 6: they cover all of 0..3
  assert metrics.precision_recall(line, far, k=1) == (0.5, 1.0)
  assert metrics.precision_recall(far, line, k=1) == (1.0, 0.5)  # recall's balls too


def test_precision_recall_of_samples_from_half_the_modes():
  """Fakes from 2 of 4 well-separated 2-D clusters: all plausible (precision ~1), half the
  data covered (recall ~0.5; measured 0.978 and 0.467). In 16-D the k=3 balls of 500 points a
  cluster cover only ~75 % of the same law, so the clusters are 2-D."""
  rng = np.random.default_rng(0)
  centers = 20.0 * np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
  real = centers[rng.integers(0, 4, 2000)] + rng.normal(size=(2000, 2))
  fake = centers[rng.integers(0, 2, 1000)] + rng.normal(size=(1000, 2))
  precision, recall = metrics.precision_recall(real, fake, k=3, block_size=256)
  assert precision > 0.95
  assert 0.4 < recall < 0.55


@pytest.mark.parametrize("real_shape,fake_shape,k,match", [
    ((10, 4), (10, 4), 0, "k"), ((10, 4), (10, 4), 2.0, "k"), ((10, 4), (3, 4), 3, "at least"),
    ((3, 4), (10, 4), 3, "at least"), ((10, 4), (10, 5), 3, "equal d"), ((10,), (10,), 1, "(N, d)"),
])
def test_precision_recall_rejects_bad_input(real_shape, fake_shape, k, match):
  with pytest.raises(InputError, match=match.replace("(", r"\(").replace(")", r"\)")):
    metrics.precision_recall(np.zeros(real_shape), np.ones(fake_shape), k=k)


# --- the network and its cache -----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
  return datasets.get_dataset(datasets.DataSpec("digits", image_size=8, num_channels=1))


def split_arrays(dataset, split):
  source = dataset.source(split)
  images, labels = source.fetch(np.arange(len(source)))
  return images, labels


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
  """(variables, info) of the digits network, trained once into a module-wide cache root."""
  root = str(tmp_path_factory.mktemp("cache"))
  variables, info = domain.load_or_train("digits", digits, TINY, cache_root=root)
  assert not info["cached"]
  return variables, info, root


def tree_equal(a, b):
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def test_training_is_deterministic_and_learns(digits, trained):
  variables, info, _ = trained
  images, labels = split_arrays(digits, "train")
  again = domain.train_domain_classifier(images.astype(np.float32) / 255, labels, 10, TINY)
  assert tree_equal(again, variables)
  assert info["test_accuracy"] > MIN_DIGITS_ACCURACY
  assert info["num_train"] == 1618 and info["num_test"] == 179 and info["num_classes"] == 10
  assert info["path"] == os.path.join(info["path"].rsplit(os.sep, 2)[0], "domain_classifier",
                                      f"digits_{info['key']}.npz")


def test_the_second_load_reads_the_cache(digits, trained, monkeypatch):
  variables, info, root = trained

  def no_training(*args, **kwargs):
    raise AssertionError("trained although the cache holds the network")

  monkeypatch.setattr(domain, "train_domain_classifier", no_training)
  loaded, loaded_info = domain.load_or_train("digits", digits, TINY, cache_root=root)
  assert loaded_info["cached"] and loaded_info["path"] == info["path"]
  assert tree_equal(loaded, variables)
  assert loaded_info["test_accuracy"] == info["test_accuracy"]
  assert loaded_info["train_seconds"] == pytest.approx(info["train_seconds"])


def test_the_key_changes_with_the_data_and_the_recipe():
  rng = np.random.default_rng(0)
  images, labels = rng.random((20, 8, 8, 1), np.float32), rng.integers(0, 10, 20)
  key = domain.training_key(images, labels, 10, TINY)
  assert key == domain.training_key(images.copy(), labels.copy(), 10, TINY)
  changed_pixel, changed_label = images.copy(), labels.copy()
  changed_pixel[3, 4, 5, 0] += 0.5
  changed_label[7] = (changed_label[7] + 1) % 10
  others = [domain.training_key(changed_pixel, labels, 10, TINY),
            domain.training_key(images, changed_label, 10, TINY),
            domain.training_key(images.reshape(20, 4, 16, 1), labels, 10, TINY),
            domain.training_key(images.astype(np.float64), labels, 10, TINY),
            domain.training_key(images, labels, 11, TINY),
            domain.training_key(images, labels, 10, dataclasses.replace(TINY, learning_rate=1e-3)),
            domain.training_key(images, labels, 10, dataclasses.replace(TINY, seed=1))]
  assert len({key, *others}) == 1 + len(others)


@pytest.mark.parametrize("change,match", [
    ({"labels": 10}, r"labels must be in \[0, 10\)"), ({"count": 20}, "fewer than one batch"),
    ({"recipe": {"epochs": 0}}, "recipe.epochs"), ({"recipe": {"widths": (8, -1)}}, "widths"),
    ({"recipe": {"schedule": "linear"}}, "recipe.schedule"), ({"channels": 2}, "1 or 3"),
])
def test_training_refuses_bad_input(change, match):
  images = np.zeros((change.get("count", 40), 8, 8, change.get("channels", 1)), np.float32)
  labels = np.full(images.shape[0], change.get("labels", 3))
  recipe = dataclasses.replace(TINY, **change.get("recipe", {}))
  with pytest.raises(InputError, match=match):
    domain.train_domain_classifier(images, labels, 10, recipe)


class CountingTraining:
  """Stands in for train_domain_classifier: counts calls, returns given variables."""

  def __init__(self, variables):
    self.variables, self.calls = variables, 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self.variables


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign", "nan"])
def test_a_bad_cache_file_is_retrained_with_a_warning(digits, trained, tmp_path, monkeypatch,
                                                      caplog, damage):
  variables, info, _ = trained
  path = str(tmp_path / "domain_classifier" / os.path.basename(info["path"]))
  os.makedirs(os.path.dirname(path))
  shutil.copy(info["path"], path)
  if damage == "truncated":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif damage == "garbage":
    with open(path, "wb") as f:
      f.write(b"not a zip file" * 10)
  else:  # a readable file, for another recipe or with broken parameters
    with np.load(path) as data:
      arrays = dict(data)
    if damage == "foreign":
      arrays["recipe"] = np.asarray(dataclasses.replace(TINY, epochs=5).to_json())
    else:
      arrays["params/params/Dense_0/bias"] = arrays["params/params/Dense_0/bias"] * np.nan
    np.savez(path, **arrays)
  training = CountingTraining(variables)
  monkeypatch.setattr(domain, "train_domain_classifier", training)
  with caplog.at_level(logging.WARNING):
    _, retrained = domain.load_or_train("digits", digits, TINY, cache_root=str(tmp_path))
  assert training.calls == 1 and not retrained["cached"] and retrained["path"] == path
  assert "retraining and replacing it" in caplog.text and path in caplog.text
  caplog.clear()
  loaded, again = domain.load_or_train("digits", digits, TINY, cache_root=str(tmp_path))
  assert again["cached"] and training.calls == 1 and tree_equal(loaded, variables)
  assert not caplog.records  # the replaced file is good


def test_the_cache_root_honours_the_environment(digits, trained, tmp_path, monkeypatch):
  monkeypatch.setenv("SGM_JAX_CACHE_DIR", str(tmp_path / "explicit"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert domain.cache_dir() == str(tmp_path / "explicit")
  training = CountingTraining(trained[0])
  monkeypatch.setattr(domain, "train_domain_classifier", training)
  _, info = domain.load_or_train("digits", digits, TINY)
  assert info["path"] == str(tmp_path / "explicit" / "domain_classifier" /
                             f"digits_{info['key']}.npz")
  assert os.path.isfile(info["path"]) and training.calls == 1
  monkeypatch.delenv("SGM_JAX_CACHE_DIR")
  assert domain.cache_dir() == str(tmp_path / "xdg" / "sgm_jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert domain.cache_dir() == str(tmp_path / "home" / ".cache" / "sgm_jax")


def test_datasets_without_labels_or_images_are_refused(tmp_path):
  moons = datasets.get_dataset(datasets.DataSpec("moons", toy_num_train=100, toy_num_test=50))
  with pytest.raises(InputError, match="'moons' is not images.*feature_extractor='effnet'"):
    domain.load_or_train("moons", moons, TINY, cache_root=str(tmp_path))
  np.savez(tmp_path / "unlabelled.npz", images=np.zeros((40, 8, 8, 1), np.uint8))
  unlabelled = datasets.get_dataset(datasets.DataSpec(
      "npz", image_size=8, num_channels=1, data_dir=str(tmp_path / "unlabelled.npz")))
  with pytest.raises(InputError, match="'mine' has no class labels.*feature_extractor='effnet'"):
    domain.load_or_train("mine", unlabelled, TINY, cache_root=str(tmp_path))


# --- the feature extractor ---------------------------------------------------------------------


def test_the_extractor_scores_real_images_close_and_noise_far(digits, trained, monkeypatch):
  monkeypatch.setattr(domain, "train_domain_classifier", CountingTraining(None))
  root = trained[2]
  extractor = domain.get_domain_extractor("digits", digits, batch_size=64, recipe=TINY,
                                          cache_root=root)
  assert (extractor.name, extractor.metric_name) == ("domain", "FD-Domain")
  assert extractor.weights_id == f"domain:{trained[1]['key']}"
  assert (extractor.feature_dim, extractor.num_classes, extractor.input_size) == (32, 10, 8)
  train, _ = split_arrays(digits, "train")
  test, test_labels = split_arrays(digits, "test")
  out = extractor(test)
  assert out["features"].shape == (179, 32) and out["logits"].shape == (179, 10)
  assert np.mean(out["logits"].argmax(-1) == test_labels) == trained[1]["test_accuracy"]
  as_float = extractor(test.astype(np.float32) / 255)
  # x / 255 on the device and in numpy may round apart by an ulp
  np.testing.assert_allclose(as_float["features"], out["features"], rtol=1e-5, atol=1e-5)

  def fd(images):
    return metrics.frechet_distance_from_features(extractor(images)["features"],
                                                  extractor(train)["features"])

  noise = np.random.default_rng(0).integers(0, 256, test.shape, dtype=np.uint8)
  real, fake = fd(test), fd(noise)
  assert real < 0.1 * fake, (real, fake)
  upsampled = extractor(np.repeat(np.repeat(test[:5], 2, axis=1), 2, axis=2))  # resized to 8x8
  assert upsampled["features"].shape == (5, 32) and np.isfinite(upsampled["features"]).all()
  with pytest.raises(InputError, match="1-channel"):
    extractor(np.zeros((4, 8, 8, 3), np.float32))
