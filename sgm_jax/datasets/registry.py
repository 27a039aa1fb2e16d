"""Dataset names -> loaders: `DATASETS`, `load_source(spec, split)` and `example_shape(spec)`."""
from __future__ import annotations

from typing import Callable

from sgm_jax.datasets import local, tfds_sources, toy2d
from sgm_jax.datasets.sources import Source
from sgm_jax.datasets.spec import DataSpec, normalize_name
from sgm_jax.errors import InputError

Loader = Callable[[DataSpec, str], Source]

# Display name -> loader(spec, split). Matching ignores case, '-' and '_'.
DATASETS: dict[str, Loader] = {
    "CIFAR10": tfds_sources.load_tfds_named,
    "SVHN": tfds_sources.load_tfds_named,
    "CELEBA": tfds_sources.load_tfds_named,
    "LSUN": tfds_sources.load_tfds_named,
    "MNIST": tfds_sources.load_tfds_named,
    "FashionMNIST": local.load_fashion_mnist,
    "idx": local.load_idx,
    "MNIST5k": local.load_mnist5k,
    "digits": local.load_digits,
    "npz": local.load_npz,
    "folder": local.load_folder,
    **{name: toy2d.load_toy for name in toy2d.TOY_DATASETS},
}
TFDS_PREFIX = "tfds:"

_LOADERS = {normalize_name(k): v for k, v in DATASETS.items()}


def load_source(spec: DataSpec, split: str) -> Source:
  """The Source of one split ('train' or 'test'; tfds datasets also take tfds split strings)."""
  if spec.dataset.startswith(TFDS_PREFIX):
    return tfds_sources.load_tfds(spec, split, spec.dataset[len(TFDS_PREFIX):])
  return _loader(spec)(spec, split)


def example_shape(spec: DataSpec) -> tuple[int, ...]:
  """The shape of one example of the batches' 'image', from the spec alone (nothing is loaded):
  (2,) for the toy 2-D sets, else (image_size, image_size, num_channels), to which every image
  source fits its images. An unknown dataset name raises the ValueError of load_source."""
  if not spec.dataset.startswith(TFDS_PREFIX) and _loader(spec) is toy2d.load_toy:
    return (2,)
  return (spec.image_size, spec.image_size, spec.num_channels)


def _loader(spec: DataSpec) -> Loader:
  loader = _LOADERS.get(normalize_name(spec.dataset))
  if loader is None and normalize_name(spec.dataset) in ("ffhq", "celebahq"):
    raise InputError(f"dataset {spec.dataset!r}: score_sde read it from TFRecords, which needs "
                     "TensorFlow; export the images to a folder or an .npz file and use "
                     "dataset 'folder' or 'npz' with config.data.data_dir")
  if loader is None:
    raise InputError(f"unknown dataset {spec.dataset!r}; valid names: {', '.join(DATASETS)}, "
                     "or 'tfds:<builder>' for any tensorflow-datasets image dataset")
  return loader
