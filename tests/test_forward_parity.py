"""Forward parity with the original score_sde code: four shrunken original networks (NCSN++ VE
continuous, DDPM++ VP continuous, DDPM VP discrete, NCSNv2 VE discrete), each a training checkpoint
in the original format with the network output and the score that the ORIGINAL code computed from
its EMA parameters at fixed (x, t) (tests/data/forward, see its README.md).

Our config of the same path with the recorded overrides, our converter (sgm_jax.convert), our
networks and our score functions (sgm_jax.score.get_score_fn, what sampling uses) must reproduce
them within 1e-4 relative per example. The reference is discriminating: the live parameters, norm
scale and bias swapped, or Adam's moments swapped all fail it or the checks below.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from reference_data import FORWARD  # noqa: E402
from sgm_jax import convert, models, score, sde_lib  # noqa: E402

FAMILIES = ["ve_cifar10_ncsnpp_continuous", "vp_cifar10_ddpmpp_continuous", "vp_ddpm_cifar10",
            "ve_ncsnv2_cifar10"]
TOLERANCE = 1e-4  # the reference README: independent float32 implementations agree to ~1e-5
INPUT_SHAPE = (1, 32, 32, 3)
pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute


# --- building our side from a family's files ------------------------------------------------------
def _family_dir(name: str) -> str:
  path = os.path.join(FORWARD, name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"forward reference {path} is missing: tests/data/forward is a copy "
                            "of ../shared/reference/forward (see tests/reference_data.py)")
  return path


def _our_config(source_config: str):
  """get_config() of our file at the original's path (configs/vp/ddpm/cifar10.py, ...)."""
  module = os.path.splitext(source_config)[0].replace("/", ".")
  return importlib.import_module(module).get_config()


def _as_config_value(value):
  return tuple(value) if isinstance(value, list) else value


def _apply_reference_config(config, recorded: dict):
  """Our config with the recorded model and data sections, training.sde and training.continuous."""
  with config.unlocked():
    for section in ("model", "data"):
      for key, value in recorded[section].items():
        config[section][key] = _as_config_value(value)
    config.training.sde = recorded["training"]["sde"]
    config.training.continuous = recorded["training"]["continuous"]
  return config


@functools.lru_cache(maxsize=None)
def _forward_fn(model, sde: sde_lib.SDE, continuous: bool):
  """jit-compiled (variables, x, t) -> (labels, network output, score), compiled once per family
  and reused for every variables tree of the same shapes."""

  @jax.jit
  def forward(variables, x, t):
    labels = sde.time_label(t, continuous)
    output = model.apply(variables, x, labels, train=False)
    score_fn = score.get_score_fn(sde, model, variables, continuous=continuous)
    return labels, output, score_fn(x, t)

  return forward


class Family:
  """One reference family: its recorded metadata and inputs/outputs, our config, SDE, network and
  the converted checkpoint."""

  def __init__(self, name: str):
    self.name = name
    self.dir = _family_dir(name)
    with open(os.path.join(self.dir, "config.json")) as f:
      self.meta = json.load(f)
    with np.load(os.path.join(self.dir, "io.npz")) as npz:
      self.io = {k: npz[k] for k in npz.files}
    self.config = _apply_reference_config(_our_config(self.meta["source_config"]),
                                          self.meta["config"])
    self.continuous = bool(self.config.training.continuous)
    self.sde = sde_lib.from_config(self.config)
    self.model = models.create_model(self.config, self.sde)
    self.checkpoint = os.path.join(self.dir, "checkpoint_1")
    self.ema = convert.load_sampling_variables(self.checkpoint, self.model, INPUT_SHAPE)
    self.live = convert.load_sampling_variables(self.checkpoint, self.model, INPUT_SHAPE,
                                                use_ema=False)

  def forward(self, variables):
    fn = _forward_fn(self.model, self.sde, self.continuous)
    labels, output, score_ = fn(variables, jnp.asarray(self.io["x"]), jnp.asarray(self.io["t"]))
    return np.asarray(labels), np.asarray(output), np.asarray(score_)


@functools.lru_cache(maxsize=None)
def _family(name: str) -> Family:
  return Family(name)


@functools.lru_cache(maxsize=None)
def _ema_forward(name: str):
  family = _family(name)
  return family.forward(family.ema)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> Family:
  return _family(request.param)


def relative_errors(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """Per example: the larger of ||ours - ref||_2 / ||ref||_2 and max|ours - ref| / max|ref|
  (per example, so the large-sigma example cannot hide the other)."""
  diff = (np.asarray(ours, np.float64) - ref).reshape(len(ref), -1)
  ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
  l2 = np.linalg.norm(diff, axis=1) / np.linalg.norm(ref, axis=1)
  peak = np.abs(diff).max(axis=1) / np.abs(ref).max(axis=1)
  return np.maximum(l2, peak)


# --- our configs are the original ones ------------------------------------------------------------
def test_our_config_of_the_same_path_holds_the_original_settings(family):
  """Without the recorded overrides, our config file has every model/data value, SDE and
  continuous flag of the original config file."""
  ours = _our_config(family.meta["source_config"])
  recorded = family.meta["config"]
  overridden = set(family.meta["overrides"])
  for section in ("model", "data"):
    for key, value in recorded[section].items():
      if f"{section}.{key}" in overridden:
        continue
      assert key in ours[section], f"{family.name}: our config lacks {section}.{key}"
      assert _as_config_value(ours[section][key]) == _as_config_value(value), (
          f"{family.name}: {section}.{key} is {ours[section][key]!r}, the original {value!r}")
  assert ours.training.sde == recorded["training"]["sde"] == family.meta["sde"]
  assert ours.training.continuous == recorded["training"]["continuous"] == family.meta["continuous"]
  assert sum(np.size(v) for v in convert.flatten(family.ema).values()) == family.meta["num_params"]


# --- the network and the score at the recorded inputs ----------------------------------------------
def test_time_labels_are_the_ones_the_original_fed(family):
  labels, _, _ = _ema_forward(family.name)
  want = family.io["labels"]
  assert labels.dtype == want.dtype, f"{family.name}: labels {labels.dtype}, original {want.dtype}"
  if np.issubdtype(want.dtype, np.integer):
    np.testing.assert_array_equal(labels, want)
  else:
    np.testing.assert_allclose(labels, want, rtol=1e-6)


def test_network_output_matches_the_original(family):
  _, output, _ = _ema_forward(family.name)
  errors = relative_errors(output, family.io["network_output"])
  assert errors.max() < TOLERANCE, f"{family.name}: relative errors {errors}"


def test_score_matches_the_original(family):
  _, _, score_ = _ema_forward(family.name)
  errors = relative_errors(score_, family.io["score"])
  assert errors.max() < TOLERANCE, f"{family.name}: relative errors {errors}"


# --- the comparison is discriminating ---------------------------------------------------------------
def test_live_parameters_differ_and_do_not_reproduce_the_reference(family):
  """optimizer/target is not params_ema: every leaf differs, and the network computed with the
  live parameters is far from the reference (a converter picking them would fail above)."""
  ema, live = convert.flatten(family.ema["params"]), convert.flatten(family.live["params"])
  assert ema.keys() == live.keys()
  same = ["/".join(p) for p in ema if np.array_equal(ema[p], live[p])]
  assert not same, f"{family.name}: leaves equal in params_ema and optimizer/target: {same}"
  _, output, score_ = family.forward(family.live)
  assert relative_errors(output, family.io["network_output"]).min() > 0.1
  assert relative_errors(score_, family.io["score"]).min() > 0.1


_NORM_PAIRS = {"GroupNorm": ("scale", "bias"), "InstanceNorm2dPlus": ("gamma", "beta")}


def _swap_norm_affine(params):
  """Every normalization layer's multiplicative and additive parameters exchanged."""
  flat = convert.flatten(params)
  swapped = dict(flat)
  count = 0
  for path in flat:
    for module, (mul, add) in _NORM_PAIRS.items():
      if path[-2].startswith(module) and path[-1] == mul:
        other = path[:-1] + (add,)
        swapped[path], swapped[other] = flat[other], flat[path]
        count += 1
  return convert.unflatten(swapped), count


def test_norm_scale_and_bias_swapped_do_not_reproduce_the_reference(family):
  params, count = _swap_norm_affine(family.ema["params"])
  assert count > 0, f"{family.name}: no normalization layer found"
  _, output, _ = family.forward({"params": params})
  assert relative_errors(output, family.io["network_output"]).max() > 100 * TOLERANCE


# --- the full training state -----------------------------------------------------------------------
def _legacy_moments(family, moment: str) -> dict:
  """The checkpoint's Adam moment `moment` per parameter path, GroupNorm leaves as (C,)."""
  state = convert.read_training_state(family.checkpoint)
  flat = convert.flatten(state["optimizer"]["state"]["param_states"])
  tree = convert.unflatten({p[:-1]: v for p, v in flat.items() if p[-1] == moment})
  return convert.flatten(convert.fix_groupnorm_shapes(tree, family.ema["params"]))


def test_training_state_converts_to_optax_adam_that_continues_the_original(family):
  """params, params_ema and Adam's moments land where they belong: mu = grad_ema (|mu| <= 1e-3,
  both signs) and nu = grad_sq_ema (0 <= nu <= 1e-6) as the reference's deterministic values
  imply, and one optax.adam step from the converted state is flax.optim.Adam's next step."""
  out = convert.load_training_dict(family.checkpoint, family.model, INPUT_SHAPE)
  recorded = family.meta["checkpoint"]
  assert out["step"] == recorded["step"] and out["adam_count"] == recorded["optimizer_state_step"]
  assert out["lr"] == pytest.approx(recorded["lr"]) and out["ema_rate"] == pytest.approx(
      recorded["ema_rate"])
  np.testing.assert_array_equal(out["rng"], np.asarray(jax.random.PRNGKey(42)))
  for name, variables in (("params", family.live), ("params_ema", family.ema)):
    got, want = convert.flatten(out[name]), convert.flatten(variables["params"])
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[p], want[p]) for p in want), name

  mu, nu = convert.flatten(out["mu"]), convert.flatten(out["nu"])
  for name, flat, moment in (("mu", mu, "grad_ema"), ("nu", nu, "grad_sq_ema")):
    want = _legacy_moments(family, moment)
    assert flat.keys() == want.keys() == convert.flatten(out["params"]).keys()
    assert all(np.array_equal(flat[p], want[p]) for p in want), name
  mu_all = np.concatenate([np.ravel(v) for v in mu.values()])
  nu_all = np.concatenate([np.ravel(v) for v in nu.values()])
  assert mu_all.min() < 0 < mu_all.max() and np.abs(mu_all).max() <= 1e-3 * (1 + 1e-6)
  assert nu_all.min() >= 0 and 0 < nu_all.max() <= 1e-6 * (1 + 1e-5)

  # optax's Adam state for these parameters has the converted moments' tree (shapes only).
  abstract = jax.eval_shape(optax.adam(out["lr"]).init, out["params"])[0]
  assert jax.tree_util.tree_structure(abstract.mu) == jax.tree_util.tree_structure(out["mu"])
  assert (jax.tree_util.tree_map(lambda s: s.shape, abstract.nu) ==
          jax.tree_util.tree_map(np.shape, out["nu"]))

  # One step with gradient g from the converted state (on a sample of leaves): optax.adam's
  # update equals flax.optim.Adam's (bias-corrected moments at step count + 1, eps outside the
  # square root), so the converted state continues the original run.
  lr, beta1, beta2, eps = out["lr"], 0.9, 0.999, 1e-8
  paths = sorted(mu)[:: max(1, len(mu) // 25)]
  sample = lambda flat: {"/".join(p): flat[p] for p in paths}
  params = sample(convert.flatten(out["params"]))
  grads = {k: np.float32(1e-3) * np.cos(v) for k, v in params.items()}
  tx = optax.adam(lr, b1=beta1, b2=beta2, eps=eps)
  state = (optax.ScaleByAdamState(count=jnp.asarray(out["adam_count"], jnp.int32),
                                  mu=sample(mu), nu=sample(nu)), optax.EmptyState())
  updates, _ = jax.jit(tx.update)(grads, state, params)
  step = out["adam_count"] + 1
  for key, (m0, v0) in zip(params, zip(sample(mu).values(), sample(nu).values())):
    g = grads[key].astype(np.float64)
    m = beta1 * m0 + (1 - beta1) * g
    v = beta2 * v0 + (1 - beta2) * g ** 2
    want = -lr * (m / (1 - beta1 ** step)) / (np.sqrt(v / (1 - beta2 ** step)) + eps)
    np.testing.assert_allclose(updates[key], want, rtol=1e-4, atol=1e-9, err_msg=key)
