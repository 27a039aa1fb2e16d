"""configs/: every file loads, holds the score_sde fields, and reproduces the original configs.

The original hyper-parameters (config.model), SDE and continuous flag, and image shape of each
score_sde config are compared with ../shared/reference/param_trees/*.json where available.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys

import jax
import ml_collections
import pytest
from ml_collections.config_flags import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from param_trees import assert_matches_reference, module_call_order  # noqa: E402
from reference_data import PARAM_TREES  # noqa: E402
from sgm_jax import datasets, models, sampling  # noqa: E402
from sgm_jax.cli import setup  # noqa: E402
from sgm_jax.models import ncsnpp  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs")
REF = PARAM_TREES
MODERN = os.path.join(REF, "modern_flax")

SCORE_SDE_DEFAULTS = ["configs/default_cifar10_configs.py", "configs/default_celeba_configs.py",
                      "configs/default_lsun_configs.py"]
SHORT_NAMES = {
    "configs/vp_cifar10.py": "configs/vp/cifar10_ddpmpp_continuous.py",
    "configs/ve_cifar10.py": "configs/ve/cifar10_ncsnpp_continuous.py",
    "configs/subvp_cifar10.py": "configs/subvp/cifar10_ddpmpp_continuous.py",
}
# Every experiment config of score_sde (configs/ve/ncsn/* included: the original code cannot
# build NCSNv1, but its sampling settings are still of use).
ORIGINAL = [
    "configs/ve/cifar10_ncsnpp.py", "configs/ve/cifar10_ncsnpp_continuous.py",
    "configs/ve/cifar10_ncsnpp_deep_continuous.py", "configs/ve/celeba_ncsnpp.py",
    "configs/ve/bedroom_ncsnpp_continuous.py", "configs/ve/church_ncsnpp_continuous.py",
    "configs/ve/celebahq_256_ncsnpp_continuous.py", "configs/ve/ffhq_256_ncsnpp_continuous.py",
    "configs/ve/celebahq_ncsnpp_continuous.py", "configs/ve/ffhq_ncsnpp_continuous.py",
    "configs/ve/cifar10_ddpm.py",
    "configs/ve/ncsnv2/cifar10.py", "configs/ve/ncsnv2/celeba.py", "configs/ve/ncsnv2/bedroom.py",
    "configs/ve/ncsn/cifar10.py", "configs/ve/ncsn/cifar10_124.py",
    "configs/ve/ncsn/cifar10_1245.py", "configs/ve/ncsn/cifar10_5.py",
    "configs/ve/ncsn/celeba.py", "configs/ve/ncsn/celeba_124.py",
    "configs/ve/ncsn/celeba_1245.py", "configs/ve/ncsn/celeba_5.py",
    "configs/vp/cifar10_ddpmpp.py", "configs/vp/cifar10_ddpmpp_continuous.py",
    "configs/vp/cifar10_ddpmpp_deep_continuous.py", "configs/vp/cifar10_ncsnpp.py",
    "configs/vp/cifar10_ncsnpp_continuous.py", "configs/vp/cifar10_ncsnpp_deep_continuous.py",
    "configs/vp/ddpm/cifar10.py", "configs/vp/ddpm/cifar10_continuous.py",
    "configs/vp/ddpm/cifar10_unconditional.py", "configs/vp/ddpm/celebahq.py",
    "configs/vp/ddpm/church.py", "configs/vp/ddpm/bedroom.py",
    "configs/subvp/cifar10_ddpm_continuous.py", "configs/subvp/cifar10_ddpmpp_continuous.py",
    "configs/subvp/cifar10_ddpmpp_deep_continuous.py", "configs/subvp/cifar10_ncsnpp_continuous.py",
    "configs/subvp/cifar10_ncsnpp_deep_continuous.py",
]


def _all_files() -> list[str]:
  found = []
  for dirpath, _, names in os.walk(CONFIGS):
    for name in names:
      if name.endswith(".py") and name != "__init__.py":
        found.append(os.path.relpath(os.path.join(dirpath, name), ROOT).replace(os.sep, "/"))
  return sorted(found)


ALL = _all_files()
# Shared defaults (`default_*_configs.py`, with get_default_configs()) and experiment files
# (with get_config()); other configs here (small CPU datasets, toy data) follow the same layout.
DEFAULTS = [p for p in ALL if os.path.basename(p).startswith("default_")]
EXPERIMENTS = [p for p in ALL if p not in DEFAULTS]


def load_module(relpath: str):
  path = os.path.join(ROOT, relpath)
  spec = importlib.util.spec_from_file_location("cfg_" + relpath.replace("/", "_")[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(relpath: str) -> ml_collections.ConfigDict:
  return load_module(relpath).get_config()


def test_every_original_config_and_short_name_exists():
  assert sorted(set(ORIGINAL + list(SHORT_NAMES) + SCORE_SDE_DEFAULTS) - set(ALL)) == []


@pytest.mark.parametrize("relpath", DEFAULTS)
def test_default_configs_load(relpath):
  config = load_module(relpath).get_default_configs()
  assert isinstance(config, ml_collections.ConfigDict)
  for section in ("training", "sampling", "eval", "data", "model", "optim"):
    assert isinstance(config[section], ml_collections.ConfigDict)
  assert isinstance(config.seed, int) and "image_size" in config.data


@pytest.mark.parametrize("relpath", EXPERIMENTS)
def test_every_config_file_loads(relpath):
  config = load_config(relpath)
  assert isinstance(config, ml_collections.ConfigDict)
  assert isinstance(config.model.name, str)
  assert isinstance(config.data.image_size, int)
  assert isinstance(config.training.sde, str)
  # A fresh ConfigDict on every call: editing one does not leak into the next.
  config.model.name = "edited"
  assert load_config(relpath).model.name != "edited"


REQUIRED = {
    "training": ("sde", "continuous", "batch_size", "n_iters", "n_jitted_steps", "reduce_mean",
                 "likelihood_weighting", "snapshot_freq", "log_freq", "eval_freq"),
    "sampling": ("method", "predictor", "corrector", "snr", "n_steps_each", "noise_removal",
                 "probability_flow"),
    "eval": ("batch_size", "num_samples", "begin_ckpt", "end_ckpt", "enable_sampling",
             "enable_loss", "enable_bpd", "bpd_dataset"),
    "data": ("dataset", "image_size", "num_channels", "centered", "random_flip",
             "uniform_dequantization"),
    "model": ("name", "sigma_min", "sigma_max", "num_scales", "ema_rate", "dropout", "nf"),
    "optim": ("optimizer", "lr", "beta1", "eps", "warmup", "grad_clip", "weight_decay"),
}


@pytest.mark.parametrize("relpath", ORIGINAL + sorted(SHORT_NAMES))
def test_score_sde_config_has_the_original_fields(relpath):
  config = load_config(relpath)
  for section, keys in REQUIRED.items():
    missing = [k for k in keys if k not in config[section]]
    assert missing == [], f"{relpath}: config.{section} lacks {missing}"
  assert config.training.sde in ("vesde", "vpsde", "subvpsde")
  assert isinstance(config.training.continuous, bool)
  assert config.data.image_size in (32, 64, 128, 256, 1024)
  assert isinstance(config.seed, int)
  if config.training.sde != "vesde":
    assert {"beta_min", "beta_max"} <= set(config.model)


@pytest.mark.parametrize("short,long", sorted(SHORT_NAMES.items()))
def test_short_names_equal_their_long_configs(short, long):
  assert load_config(short).to_dict() == load_config(long).to_dict()


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_config_flags_loads_a_config_by_path():
  """The way main.py reads --config: ml_collections' config-file flag parser."""
  parser = config_flags.ConfigFileFlagParser(name="config")
  config = parser.parse(os.path.join(ROOT, "configs", "vp_cifar10.py"))
  assert config.model.name == "ncsnpp" and config.training.sde == "vpsde"
  assert config.data.centered and not config.model.fir


@pytest.mark.parametrize("relpath", [p for p in ORIGINAL if "ncsnpp" in p or "ddpmpp" in p])
def test_ncsnpp_configs_build_the_typed_network(relpath):
  config = load_config(relpath)
  assert config.model.name == "ncsnpp"
  model = ncsnpp.from_config(config)
  assert (model.nf, model.ch_mult, model.num_res_blocks) == (
      config.model.nf, tuple(config.model.ch_mult), config.model.num_res_blocks)
  assert (model.image_size, model.centered) == (config.data.image_size, config.data.centered)


def _reference_jsons() -> list[str]:
  if not os.path.isdir(REF):
    return []
  names = []
  for name in sorted(os.listdir(REF)):
    if name.endswith(".json") and not name.startswith(("_", "summary", "failures", "classifier")):
      names.append(name)
  return names


def _plain(value):
  return list(value) if isinstance(value, (tuple, list)) else value


@pytest.mark.parametrize("name", _reference_jsons() or ["<reference missing>"])
def test_config_matches_original_score_sde(name):
  if not os.path.isdir(REF):
    pytest.skip(f"reference files not available at {REF}")
  with open(os.path.join(REF, name)) as f:
    ref = json.load(f)
  config = load_config(ref["config"])
  # dtype and remat are ours (how the network computes, models/__init__.py), not score_sde's
  ours = {k: _plain(v) for k, v in config.model.items() if k not in ("dtype", "remat")}
  assert ours == ref["model_config"]
  assert {"sde": config.training.sde, "continuous": config.training.continuous} == (
      ref["training_config"])
  assert [config.data.image_size, config.data.image_size, config.data.num_channels] == (
      ref["image_shape"])


def test_reference_covers_every_buildable_original_config():
  if not os.path.isdir(REF):
    pytest.skip(f"reference files not available at {REF}")
  configs = set()
  for name in _reference_jsons():
    with open(os.path.join(REF, name)) as f:
      configs.add(json.load(f)["config"])
  with open(os.path.join(REF, "failures.json")) as f:
    unbuildable = {"configs/" + path for path in json.load(f)}
  assert configs | unbuildable == set(ORIGINAL)


def _has_get_config(relpath: str) -> bool:
  with open(os.path.join(ROOT, relpath)) as f:
    return "def get_config(" in f.read()


WITH_GET_CONFIG = [p for p in ALL if _has_get_config(p)]
# score_sde read these from TFRecords: the config names a dataset that needs exporting first.
TFRECORD_DATASETS = ("FFHQ", "CelebAHQ")


def test_every_experiment_config_has_get_config():
  assert [p for p in EXPERIMENTS if p not in WITH_GET_CONFIG] == []
  assert len(WITH_GET_CONFIG) >= len(ORIGINAL) + len(SHORT_NAMES)


# Fields of NCSN++ that do not change its parameter tree: configs whose networks differ only in
# these, in their SDE or in their sampling settings (vp/ and subvp/, the short names) trace one.
_PARAM_FREE = ("scale_by_sigma", "sigma_min", "sigma_max", "num_scales", "centered", "dropout",
               "fourier_scale", "nonlinearity")
_TRACED = {}


def _network_key(model) -> object:
  if not isinstance(model, ncsnpp.NCSNpp):
    return model
  return tuple((f.name, getattr(model, f.name)) for f in dataclasses.fields(model)
               if f.name not in _PARAM_FREE + ("parent", "name"))


def _traced(config, model, shape: tuple) -> tuple[object, list]:
  """The abstract train state of `config` (setup.abstract_initial_state, the checkpoint restore
  target of run_sample: jax.eval_shape traces model.init, nothing is allocated) and the
  first-call order of the network's modules in that trace; each network is traced once."""
  optimizer = setup.optimizer_from_config(config)
  key = (_network_key(model), shape, optimizer)
  if key not in _TRACED:
    with module_call_order() as order:
      state = setup.abstract_initial_state(config, model, shape, optimizer.build())
    _TRACED[key] = state, order
  return _TRACED[key]


@pytest.mark.parametrize("relpath", WITH_GET_CONFIG)
def test_config_builds_its_model_and_default_sampler(relpath):
  """What `main.py --mode sample` builds from each config, without data or running anything:
  the SDE, the network's train state (shapes only: jax.eval_shape traces model.init) for the
  image shape of the config's dataset spec, and the sampler of config.sampling.method with its
  options (the PC predictor, corrector, snr, n_steps_each, ... of config.sampling)."""
  config = load_config(relpath)
  sde = setup.sde_from_config(config)
  if config.data.dataset in TFRECORD_DATASETS:
    with pytest.raises(ValueError, match="'folder' or 'npz'"):
      datasets.example_shape(datasets.from_config(config))
    config.data.dataset = "folder"  # what the error tells the user to do
  shape = datasets.example_shape(datasets.from_config(config))  # loads no data
  assert shape in ((2,), (config.data.image_size, config.data.image_size, config.data.num_channels))
  if config.model.name == "ncsn":
    with pytest.raises(ValueError, match="NCSN v1"):
      models.create_model(config, sde)
  else:
    model = models.create_model(config, sde)
    params = _traced(config, model, shape)[0].params_ema
    leaves = jax.tree_util.tree_leaves(params)
    assert leaves and all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)
    assert sum(math.prod(v.shape) for v in leaves) > 10_000
  method = str(config.sampling.get("method", "pc"))
  num_steps = int(config.sampling.get("num_steps", sde.N))
  options = setup.sampler_options_from_config(config, method, {})
  sampler = sampling.get_sampler(method, sde, (2,) + shape, num_steps=num_steps, **options)
  assert sampler.shape == (2,) + shape
  if method == "pc":
    assert set(options) >= {"predictor", "corrector", "snr", "n_steps_each"}


# --- the parameter trees of the NCSN++ / DDPM++ configs -------------------------------------------
# Traced with jax.eval_shape (no parameters are allocated) and compared with
# ../shared/reference/param_trees/modern_flax/: same paths, same shapes, same count, and the same
# first-call order of modules (which auto-numbered `Conv_3` is which layer), so released
# checkpoints map one-to-one onto our tree.

# num_params of every original `ncsnpp` config (from the reference summary), checked even where
# the reference files are not available.
NUM_PARAMS = {
    "configs/ve/cifar10_ncsnpp.py": 62693251,
    "configs/ve/cifar10_ncsnpp_continuous.py": 62758915,
    "configs/ve/cifar10_ncsnpp_deep_continuous.py": 107587075,
    "configs/ve/celeba_ncsnpp.py": 62693251,
    "configs/ve/bedroom_ncsnpp_continuous.py": 65574549,
    "configs/ve/church_ncsnpp_continuous.py": 65574549,
    "configs/ve/celebahq_256_ncsnpp_continuous.py": 65574549,
    "configs/ve/ffhq_256_ncsnpp_continuous.py": 65574549,
    "configs/ve/celebahq_ncsnpp_continuous.py": 105785896,
    "configs/ve/ffhq_ncsnpp_continuous.py": 105785896,
    "configs/vp/cifar10_ddpmpp.py": 61804419,
    "configs/vp/cifar10_ddpmpp_continuous.py": 61804419,
    "configs/vp/cifar10_ddpmpp_deep_continuous.py": 106632579,
    "configs/vp/cifar10_ncsnpp.py": 62693251,
    "configs/vp/cifar10_ncsnpp_continuous.py": 62693251,
    "configs/vp/cifar10_ncsnpp_deep_continuous.py": 107521411,
    "configs/subvp/cifar10_ddpmpp_continuous.py": 61804419,
    "configs/subvp/cifar10_ddpmpp_deep_continuous.py": 106632579,
    "configs/subvp/cifar10_ncsnpp_continuous.py": 62693251,
    "configs/subvp/cifar10_ncsnpp_deep_continuous.py": 107521411,
}


def _param_tree(relpath: str) -> tuple[dict, list]:
  """Param paths -> shapes of the config's NCSN++ network and the first-call order of its
  modules, from _traced (the same trace as test_config_builds_its_model_and_default_sampler)."""
  config = load_config(relpath)
  model = ncsnpp.from_config(config)
  shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
  state, order = _traced(config, model, shape)
  tree = {"params/" + "/".join(p.key for p in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
  return tree, order


@pytest.mark.parametrize("relpath", sorted(NUM_PARAMS))
def test_param_count_of_every_ncsnpp_config(relpath):
  tree, _ = _param_tree(relpath)
  assert sum(math.prod(s) for s in tree.values()) == NUM_PARAMS[relpath]


def _reference_files() -> list[str]:
  if not os.path.isdir(MODERN):
    return []
  names = []
  for name in sorted(os.listdir(MODERN)):
    with open(os.path.join(MODERN, name)) as f:
      if json.load(f).get("model_name") == "ncsnpp":
        names.append(name)
  return names


def test_reference_lists_exactly_the_ncsnpp_configs_above():
  if not os.path.isdir(MODERN):
    pytest.skip(f"reference trees not available at {MODERN}")
  configs = set()
  for name in _reference_files():
    with open(os.path.join(MODERN, name)) as f:
      configs.add(json.load(f)["config"])
  assert configs == set(NUM_PARAMS)


@pytest.mark.parametrize("name", _reference_files() or ["<reference missing>"])
def test_param_tree_matches_reference(name):
  if not os.path.isdir(MODERN):
    pytest.skip(f"reference trees not available at {MODERN}")
  with open(os.path.join(MODERN, name)) as f:
    ref = json.load(f)
  config = load_config(ref["config"])
  assert [config.data.image_size] * 2 + [config.data.num_channels] == ref["image_shape"]
  tree, order = _param_tree(ref["config"])
  assert "module_call_order" in ref
  assert_matches_reference(ref, tree, order)
