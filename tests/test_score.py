"""score.py: time labels and output scaling per SDE, oracle round trips, traced variables."""
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import score as score_lib
from sgm_jax import sde_lib
from sgm_jax.toy import GaussianMixture

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

SHAPE = (3, 4, 4, 1)
T = np.array([0.013, 0.4567, 0.999], dtype=np.float32)


class Probe(nn.Module):
  """A 'network' with a known output: w * x + label (broadcast over pixels)."""

  @nn.compact
  def __call__(self, x, labels):
    w = self.param("w", nn.initializers.ones, ())
    return w * x + labels.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


class Oracle(nn.Module):
  """The exact network of a Gaussian mixture: its score or eps, time recovered from the label."""

  sde: sde_lib.SDE
  t_of_label: Callable
  output: str

  def __call__(self, x, labels):
    p = self.variables["params"]
    gm = GaussianMixture(means=p["means"], stds=p["stds"], log_weights=p["log_weights"])
    t = self.t_of_label(labels)
    return gm.eps(x, self.sde, t) if self.output == "eps" else gm.score(x, self.sde, t)


class Dropper(nn.Module):
  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    return nn.Dropout(0.5, deterministic=not train)(x + self.param("b", nn.initializers.zeros, ()))


def _x():
  return jax.random.normal(jax.random.PRNGKey(0), SHAPE)


def _mixture():
  key = jax.random.PRNGKey(1)
  means = jax.random.normal(key, (5,) + SHAPE[1:])
  return GaussianMixture.create(means, jnp.array([0.1, 0.2, 0.3, 0.15, 0.05]),
                                weights=jnp.array([0.1, 0.3, 0.2, 0.25, 0.15]))


def _probe_vars(w=1.5):
  return {"params": {"w": jnp.asarray(w, jnp.float32)}}


def _expand(v):
  return np.asarray(v, np.float64).reshape(-1, 1, 1, 1)


def _np_vp_integral(t, bmin, bmax):
  t = np.asarray(t, np.float64)
  return bmin * t + 0.5 * (bmax - bmin) * t ** 2


# --- labels and scaling against the formulas --------------------------------------------------
def test_ve_continuous_label_is_sigma_and_output_is_the_score():
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)
  x = _x()
  out = score_lib.get_score_fn(sde, Probe(), _probe_vars(), continuous=True)(x, T)
  sigma = 0.01 * (50.0 / 0.01) ** T.astype(np.float64)
  np.testing.assert_allclose(out, 1.5 * np.asarray(x) + _expand(sigma), rtol=1e-5)


def test_ve_discrete_label_is_the_reversed_rounded_index():
  sde = sde_lib.VESDE(N=10)
  t = np.array([0.0, 0.5, 1.0], np.float32)  # (1 - t) * 9 = 9, 4.5 -> 4 (round half to even), 0
  out = score_lib.get_score_fn(sde, Probe(), _probe_vars(0.0), continuous=False)(_x(), t)
  np.testing.assert_array_equal(np.asarray(out)[:, 0, 0, 0], [9.0, 4.0, 0.0])
  t = np.array([0.03, 0.47, 0.96], np.float32)  # 8.73 -> 9, 4.77 -> 5, 0.36 -> 0
  out = score_lib.get_score_fn(sde, Probe(), _probe_vars(0.0), continuous=False)(_x(), t)
  np.testing.assert_array_equal(np.asarray(out)[:, 0, 0, 0], [9.0, 5.0, 0.0])


def test_vp_continuous_label_999t_and_score_is_minus_eps_over_std():
  sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0)
  x = _x()
  out = score_lib.get_score_fn(sde, Probe(), _probe_vars(), continuous=True)(x, T)
  std = np.sqrt(1.0 - np.exp(-_np_vp_integral(T, 0.1, 20.0)))
  labels = 999.0 * T.astype(np.float64)
  expected = -(1.5 * np.asarray(x, np.float64) + _expand(labels)) / _expand(std)
  np.testing.assert_allclose(out, expected, rtol=2e-5)


def test_vp_discrete_label_and_std_from_alphas_cumprod():
  sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
  x = _x()
  out = score_lib.get_score_fn(sde, Probe(), _probe_vars(), continuous=False)(x, T)
  betas = np.linspace(0.1 / 1000, 20.0 / 1000, 1000)
  sqrt_1m_alphas_cumprod = np.sqrt(1.0 - np.cumprod(1.0 - betas))
  labels = T.astype(np.float64) * 999  # DDPM labels are not truncated; the std index is
  std = sqrt_1m_alphas_cumprod[(T * 999).astype(np.int32)]
  expected = -(1.5 * np.asarray(x, np.float64) + _expand(labels)) / _expand(std)
  np.testing.assert_allclose(out, expected, rtol=2e-5)
  # truncation, not rounding, picks the std: t = 0.4567 -> 456.23 -> 456
  assert (T[1] * 999).astype(np.int32) == 456


@pytest.mark.parametrize("continuous", [True, False])
def test_subvp_label_999t_and_std_one_minus_exp(continuous):
  sde = sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0)
  x = _x()
  out = score_lib.get_score_fn(sde, Probe(), _probe_vars(), continuous=continuous)(x, T)
  std = 1.0 - np.exp(-_np_vp_integral(T, 0.1, 20.0))
  labels = 999.0 * T.astype(np.float64)
  expected = -(1.5 * np.asarray(x, np.float64) + _expand(labels)) / _expand(std)
  np.testing.assert_allclose(out, expected, rtol=2e-5)


def test_tutorial_sde_label_is_t():
  sde = sde_lib.TutorialSDE()
  x = _x()
  out = score_lib.get_score_fn(sde, Probe(), _probe_vars(), continuous=True)(x, T)
  np.testing.assert_allclose(out, 1.5 * np.asarray(x) + _expand(T), rtol=1e-6)


def test_scalar_t_broadcasts_and_bad_t_shape_raises():
  sde = sde_lib.VPSDE()
  score_fn = score_lib.get_score_fn(sde, Probe(), _probe_vars(), continuous=True)
  x = _x()
  np.testing.assert_allclose(score_fn(x, 0.3), score_fn(x, jnp.full((3,), 0.3)), rtol=1e-6)
  with pytest.raises(ValueError, match="t must be"):
    score_fn(x, jnp.ones((2,)))


def test_model_fn_gives_raw_output():
  x = _x()
  labels = jnp.array([1.0, 2.0, 3.0])
  out = score_lib.get_model_fn(Probe(), _probe_vars(2.0))(x, labels)
  np.testing.assert_allclose(out, 2.0 * np.asarray(x) + _expand([1.0, 2.0, 3.0]), rtol=1e-6)


def test_train_mode_uses_the_dropout_key():
  x = jnp.ones(SHAPE)
  variables = {"params": {"b": jnp.zeros(())}}
  eval_fn = score_lib.get_model_fn(Dropper(), variables, train=False)
  train_fn = score_lib.get_model_fn(Dropper(), variables, train=True)
  np.testing.assert_array_equal(eval_fn(x, jnp.zeros(3)), x)
  a = train_fn(x, jnp.zeros(3), jax.random.PRNGKey(0))
  b = train_fn(x, jnp.zeros(3), jax.random.PRNGKey(0))
  c = train_fn(x, jnp.zeros(3), jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert set(np.unique(np.asarray(a))) <= {0.0, 2.0}
  score_fn = score_lib.get_score_fn(sde_lib.VESDE(), Dropper(), variables, True, train=True)
  np.testing.assert_array_equal(score_fn(x, 0.5, jax.random.PRNGKey(0)), a)


def test_invalid_inputs_raise():
  with pytest.raises(ValueError, match="'params'"):
    score_lib.get_score_fn(sde_lib.VPSDE(), Probe(), {"w": 1.0}, continuous=True)

  class Odd(sde_lib.VPSDE):
    network_output = "velocity"

  with pytest.raises(ValueError, match="velocity"):
    score_lib.get_score_fn(Odd(), Probe(), _probe_vars(), continuous=True)


# --- exact oracle round trips ------------------------------------------------------------------
def _oracle_case(name):
  if name == "vp":
    sde = sde_lib.VPSDE()
    return sde, Oracle(sde, lambda labels: labels / 999.0, "eps")
  if name == "subvp":
    sde = sde_lib.subVPSDE()
    return sde, Oracle(sde, lambda labels: labels / 999.0, "eps")
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)
  log_ratio = math.log(50.0 / 0.01)
  return sde, Oracle(sde, lambda s: (jnp.log(s) - math.log(0.01)) / log_ratio, "score")


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_oracle_network_gives_the_exact_score_eps_and_denoiser(name):
  sde, oracle = _oracle_case(name)
  gm = _mixture()
  variables = {"params": {"means": gm.means, "stds": gm.stds, "log_weights": gm.log_weights}}
  t = jnp.array([0.05, 0.3, 0.8])
  x = gm.sample(jax.random.PRNGKey(2), 3, sde, t)
  score_fn = score_lib.get_score_fn(sde, oracle, variables, continuous=True)
  exact = gm.score(x, sde, t)
  atol = 1e-6 * float(jnp.abs(exact).max())
  np.testing.assert_allclose(score_fn(x, t), exact, rtol=1e-4, atol=atol)
  eps_fn = score_lib.get_eps_fn(sde, score_fn)
  np.testing.assert_allclose(eps_fn(x, t), gm.eps(x, sde, t), rtol=1e-4, atol=1e-5)
  denoiser = score_lib.get_denoiser_fn(sde, score_fn)
  np.testing.assert_allclose(denoiser(x, t), gm.denoise(x, sde, t), rtol=1e-4, atol=1e-4)


def test_eps_and_denoiser_of_a_plain_function_match_the_mixture():
  sde = sde_lib.VPSDE()
  gm = _mixture()
  t = jnp.array([0.1, 0.5, 0.9])
  x = gm.sample(jax.random.PRNGKey(3), 3, sde, t)
  eps_fn = score_lib.get_eps_fn(sde, gm.score_fn(sde))
  np.testing.assert_allclose(eps_fn(x, t), gm.eps(x, sde, t), rtol=1e-6)
  np.testing.assert_allclose(score_lib.get_denoiser_fn(sde, gm.score_fn(sde))(x, t),
                             gm.denoise(x, sde, t), rtol=1e-6)
  score = gm.score(x, sde, t)
  eps = score_lib.eps_from_score(sde, score, t)
  np.testing.assert_allclose(score_lib.score_from_eps(sde, eps, t), score, rtol=1e-6)


# --- traced variables: one compilation for new parameters -------------------------------------
def test_score_fn_is_a_partial_and_new_variables_do_not_recompile():
  sde = sde_lib.VPSDE()
  traces = []

  @jax.jit
  def run(score_fn, x, t):
    traces.append(1)
    return score_fn(x, t)

  x = _x()
  outs = []
  for w in (1.0, 2.0, 3.0):  # a fresh score_fn each time, equal static part
    score_fn = score_lib.get_score_fn(sde, Probe(), _probe_vars(w), continuous=True)
    assert isinstance(score_fn, jax.tree_util.Partial)
    outs.append(run(score_fn, x, T))
    np.testing.assert_allclose(outs[-1], score_fn(x, T), rtol=1e-6)
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[1])

  eps_traces = []

  @jax.jit
  def run_eps(eps_fn, x, t):
    eps_traces.append(1)
    return eps_fn(x, t)

  for w in (1.0, 2.0):
    score_fn = score_lib.get_score_fn(sde, Probe(), _probe_vars(w), continuous=True)
    run_eps(score_lib.get_eps_fn(sde, score_fn), x, T)
  assert len(eps_traces) == 1
