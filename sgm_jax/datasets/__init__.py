"""Datasets -> numpy / jax batches: tensorflow-datasets and local offline sources.

A `DataSpec` (built from `config.data` by `from_config` at the edge) names a dataset and how to
process it; `get_dataset(spec)` returns a `Dataset` whose iterators yield dicts of numpy arrays:

  image  float32 (B, H, W, C) in [0, 1], or [-1, 1] when `centered` (toy sets: (B, 2) points)
  label  int32 (B,), where the source has class labels
  index  int64 (B,), the example's index in its split
  mask   bool (B,), eval batches only: False on padding

Batches are already scaled (score_sde's `get_data_scaler` applied here): do not scale them again.

Order and randomness are functions of position, never of iterator state: the training stream is the
concatenation of one permutation per epoch (numpy Generator seeded by (seed, epoch)), global batch
`b` is stream positions [b B, (b + 1) B), and each example's flip and dequantization noise come from
a counter-based generator keyed by (seed, split, stream position). So the batches from step k are
the same as those of an uninterrupted run at step k, and they do not depend on the number of hosts:
host h of P takes the h-th slice of every global batch.

Modules: `spec` (DataSpec, scalers), `image_ops` (crop, resize, channels, flips, dequantization),
`idx` (the IDX reader), `sources` (the Source kinds), `local` / `tfds_sources` / `toy2d` (loaders),
`registry` (names -> loaders, `example_shape`), `prefetch` (background thread), `pipeline`
(`Dataset`: batching, sharding, device layout).
"""
from sgm_jax.datasets.image_ops import fit_image, fit_images
from sgm_jax.datasets.local import FASHION_MNIST_ENV
from sgm_jax.datasets.pipeline import Dataset, get_dataset
from sgm_jax.datasets.registry import DATASETS, example_shape, load_source
from sgm_jax.datasets.spec import (DatasetNotFoundError, DataSpec, data_scaler, from_config,
                                   inverse_scaler)
from sgm_jax.datasets.toy2d import TOY_DATASETS, toy_gmm2d_means, toy_gmm2d_mixture
from sgm_jax.errors import MissingDependencyError

__all__ = [
    "DATASETS", "DataSpec", "Dataset", "DatasetNotFoundError", "FASHION_MNIST_ENV",
    "MissingDependencyError", "TOY_DATASETS", "data_scaler", "example_shape", "fit_image",
    "fit_images", "from_config", "get_dataset", "inverse_scaler", "load_source",
    "toy_gmm2d_means", "toy_gmm2d_mixture",
]
