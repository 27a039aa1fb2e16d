import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import losses, sde_lib, toy

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

SDES = [sde_lib.VESDE(sigma_max=5.0), sde_lib.VPSDE(), sde_lib.subVPSDE()]
IDS = [type(s).__name__ for s in SDES]


@pytest.fixture(scope="module")
def mixture():
  return toy.GaussianMixture.create(jnp.array([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]]),
                                    jnp.array([0.2, 0.3, 0.25]))


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("weighting", ["sigma2", "g2", "custom", "g2_importance"])
def test_exact_score_has_the_lowest_dsm_loss(mixture, sde, weighting):
  """DSM = E lambda ||s - grad log p_t||^2 + const: any perturbation of the exact score costs."""
  x = mixture.sample(jax.random.PRNGKey(0), 4096)
  key = jax.random.PRNGKey(1)  # common random numbers for every candidate
  exact = mixture.score_fn(sde)
  kwargs = dict(weighting=weighting, eps=1e-3)
  if weighting == "custom":
    # Any positive function of t; scaled by sigma^2 so the Monte-Carlo noise of the z / sigma
    # term stays small at low noise levels.
    kwargs["weighting"] = lambda t: sde.sigma(t) ** 2 * (1.0 + t)
  if weighting == "g2_importance":
    kwargs.update(weighting="g2", importance_sampling=True)
  loss = lambda f: float(losses.dsm_loss(f, sde, x, key, **kwargs))
  base = loss(exact)
  for perturbed in (lambda x, t: 1.1 * exact(x, t), lambda x, t: exact(x, t) + 0.2,
                    lambda x, t: 0.9 * exact(x, t) - 0.1 * x):
    assert loss(perturbed) > base


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_importance_sampling_is_unbiased_with_lower_variance(mixture, sde):
  """Both estimators of the likelihood-weighted loss have the same mean; IS has less spread."""
  x = mixture.sample(jax.random.PRNGKey(0), 256)
  exact = mixture.score_fn(sde)
  score = lambda x, t: 0.8 * exact(x, t)  # imperfect, so the loss depends on t
  keys = jax.random.split(jax.random.PRNGKey(2), 400)
  run = lambda imp: jax.vmap(lambda k: losses.dsm_loss(score, sde, x, k, "g2", eps=1e-3,
                                                       importance_sampling=imp))(keys)
  plain, weighted = np.asarray(run(False)), np.asarray(run(True))
  se = math.sqrt(plain.var() / len(plain) + weighted.var() / len(weighted))
  assert abs(plain.mean() - weighted.mean()) < 5 * se
  assert weighted.std() < plain.std()


def test_importance_times_are_uniform_in_log_snr():
  sde = sde_lib.VPSDE()
  t = losses.sample_times(sde, jax.random.PRNGKey(0), 20000, 1e-3, importance_sampling=True)
  lam = np.asarray(sde.log_snr(t))
  lo, hi = float(sde.log_snr(1.0)), float(sde.log_snr(1e-3))
  hist, _ = np.histogram(lam, bins=10, range=(lo, hi))
  np.testing.assert_allclose(hist / len(lam), 0.1, atol=0.01)
  assert float(t.min()) >= 1e-3 - 1e-6 and float(t.max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("projection", ["rademacher", "gaussian"])
@pytest.mark.parametrize("variance_reduction", [True, False])
def test_ssm_and_dsm_agree_on_a_gaussian_up_to_the_known_constant(projection, variance_reduction):
  """For p_0 = N(0, s^2 I), linear scores s(x) = -a x and one noise level (unit weighting):
  DSM = ESM/2 + D/2 (1/sigma^2 - 1/v) and SSM = ESM/2 - D/(2 v), so DSM - SSM = D / (2 sigma^2)
  whatever a is (dsm_loss halves the sum over dimensions, as score_sde does)."""
  d, s0, t_fixed, n = 3, 0.7, 0.4, 200_000
  sde = sde_lib.VPSDE()
  x = s0 * jax.random.normal(jax.random.PRNGKey(0), (n, d))
  t = jnp.full((n,), t_fixed)
  unit = lambda t: jnp.ones_like(t)
  expected = 0.5 * d / float(sde.sigma(t_fixed)) ** 2
  for a in (0.5, 1.0, 2.0):
    score = lambda y, t: -a * y
    dsm = float(losses.dsm_loss(score, sde, x, jax.random.PRNGKey(1), weighting=unit, t=t))
    ssm = float(losses.ssm_loss(score, sde, x, jax.random.PRNGKey(2), projection=projection,
                                variance_reduction=variance_reduction, weighting=unit, t=t))
    np.testing.assert_allclose(dsm - ssm, expected, rtol=0.03)


def test_ssm_matches_exact_score_optimum(mixture):
  """Among scaled scores c * s_exact, SSM is minimal near c = 1."""
  sde = sde_lib.VPSDE()
  x = mixture.sample(jax.random.PRNGKey(0), 4096)
  exact = mixture.score_fn(sde)
  values = [float(losses.ssm_loss(lambda y, t: c * exact(y, t), sde, x, jax.random.PRNGKey(1),
                                  eps=1e-2)) for c in (0.8, 1.0, 1.2)]
  assert values[1] < values[0] and values[1] < values[2]


class _EpsOracle(nn.Module):
  """A 'network' with one scalar parameter c that outputs c * exact eps or c * exact score."""
  mixture: toy.GaussianMixture
  sde: sde_lib.SDE
  discrete: bool = False

  @nn.compact
  def __call__(self, x, labels, train=False):
    c = self.param("c", nn.initializers.ones, ())
    if isinstance(self.sde, sde_lib.VESDE):
      if self.discrete:
        sig = jnp.flip(self.sde.discrete_sigmas)[labels.astype(jnp.int32)]
      else:
        sig = labels
      t = self.sde.t_from_rho(sig)
      return c * self.mixture.score(x, self.sde, t)
    if self.discrete:
      abar = self.sde.alphas_cumprod[labels.astype(jnp.int32)]
      t = self.sde.t_from_log_snr(jnp.log(abar) - jnp.log1p(-abar))
    else:
      t = labels / 999.0
    return c * self.mixture.eps(x, self.sde, t)


@pytest.mark.parametrize("kind, sde", [("smld", sde_lib.VESDE(sigma_max=5.0, N=100)),
                                       ("ddpm", sde_lib.VPSDE(N=100)),
                                       ("dsm", sde_lib.VPSDE()), ("dsm", sde_lib.VESDE(sigma_max=5.0)),
                                       ("ssm", sde_lib.subVPSDE())])
def test_network_loss_is_minimal_at_the_exact_network(mixture, kind, sde):
  model = _EpsOracle(mixture, sde, discrete=kind in ("smld", "ddpm"))
  loss_fn = losses.get_loss_fn(sde, model, kind=kind, continuous=kind in ("dsm", "ssm"), eps=1e-3)
  x = mixture.sample(jax.random.PRNGKey(0), 2048)
  key = jax.random.PRNGKey(3)
  value = lambda c: float(loss_fn({"c": jnp.asarray(c)}, x, key))
  assert value(1.0) < value(0.9) and value(1.0) < value(1.1)
  grad = jax.grad(lambda p: loss_fn(p, x, key))({"c": jnp.asarray(1.0)})["c"]
  assert abs(float(grad)) < 0.25 * abs(float(jax.grad(lambda p: loss_fn(p, x, key))(
      {"c": jnp.asarray(0.7)})["c"]))


# --- values against score_sde's losses.py (get_sde_loss_fn, get_smld_loss_fn, get_ddpm_loss_fn) ---
_CALLS = []  # (x, labels) of every call of _LinearNet, to recover the t and noise a loss drew


class _LinearNet(nn.Module):
  """out = x W + (labels / label_scale) v + c on the last axis: a 'network' whose output is easy
  to compute by hand; records its inputs."""
  label_scale: float

  @nn.compact
  def __call__(self, x, labels, train=False):
    jax.debug.callback(lambda a, b: _CALLS.append((np.asarray(a, np.float64),
                                                   np.asarray(b, np.float64))), x, labels)
    w = self.param("w", nn.initializers.zeros, (3, 3))
    v = self.param("v", nn.initializers.zeros, (1, 1, 3))
    c = self.param("c", nn.initializers.zeros, (1, 1, 3))
    return x @ w + (labels / self.label_scale)[:, None, None] * v + c


_LINEAR_PARAMS = {"w": jnp.array([[0.5, -0.2, 0.1], [0.3, 0.8, -0.4], [-0.6, 0.2, 0.7]]),
                  "v": jnp.array([[[0.3, -0.5, 0.2]]]), "c": jnp.array([[[0.1, 0.0, -0.2]]])}


def _linear_net_np(x, labels, label_scale):
  p = {k: np.asarray(a, np.float64) for k, a in _LINEAR_PARAMS.items()}
  return x @ p["w"] + (labels / label_scale)[:, None, None] * p["v"] + p["c"]


def _reduce_np(v, reduce_mean):
  """score_sde's reduce_op: mean over dimensions, or 0.5 * their sum."""
  v = v.reshape(v.shape[0], -1)
  return v.mean(-1) if reduce_mean else 0.5 * v.sum(-1)


def _score_sde_kernel(sde, labels):
  """score_sde's sde_lib in float64: (t, mean coefficient, std, g) of a continuous model's time
  labels (VE: the std itself; VP and sub-VP: 999 t)."""
  if isinstance(sde, sde_lib.VESDE):
    log_ratio = np.log(sde.sigma_max / sde.sigma_min)
    std, g = labels, labels * np.sqrt(2 * log_ratio)
    return np.log(std / sde.sigma_min) / log_ratio, np.ones_like(std), std, g
  t = labels / 999.0
  b0, b1 = sde.beta_min, sde.beta_max
  log_mean_coeff = -0.25 * t ** 2 * (b1 - b0) - 0.5 * t * b0
  beta = b0 + t * (b1 - b0)
  if isinstance(sde, sde_lib.subVPSDE):
    std = 1.0 - np.exp(2.0 * log_mean_coeff)
    g = np.sqrt(beta * (1.0 - np.exp(-2.0 * b0 * t - (b1 - b0) * t ** 2)))
  else:
    std, g = np.sqrt(1.0 - np.exp(2.0 * log_mean_coeff)), np.sqrt(beta)
  return t, np.exp(log_mean_coeff), std, g


_X = np.random.default_rng(0).normal(size=(6, 4, 3)).astype(np.float32)  # B = 6, D = 12


def _loss_and_inputs(sde, kind, label_scale, **kwargs):
  """sgm_jax's loss of _LinearNet on _X, and the (x_t, labels) it evaluated the network on."""
  model = _LinearNet(label_scale)
  loss_fn = losses.get_loss_fn(sde, model, kind=kind, continuous=kind == "dsm", **kwargs)
  _CALLS.clear()
  value = float(loss_fn(_LINEAR_PARAMS, jnp.asarray(_X), jax.random.PRNGKey(7)))
  assert len(_CALLS) == 1 and np.isfinite(value)  # one network evaluation per loss
  return value, _CALLS[0]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("likelihood_weighting", [False, True])
@pytest.mark.parametrize("reduce_mean", [False, True])
def test_dsm_loss_equals_score_sde_sde_loss(sde, likelihood_weighting, reduce_mean):
  """get_sde_loss_fn: losses = (score std + z)^2 (sigma2), or g^2 (score + z / std)^2 with
  likelihood weighting, reduced by 0.5 * sum (or mean) over dimensions, averaged over the batch;
  score = -net / std for VP / sub-VP (labels 999 t), net itself for VE (labels std)."""
  label_scale = 50.0 if isinstance(sde, sde_lib.VESDE) else 999.0
  value, (x_t, labels) = _loss_and_inputs(
      sde, "dsm", label_scale, reduce_mean=reduce_mean, eps=1e-3,
      weighting="g2" if likelihood_weighting else "sigma2")
  x = _X.astype(np.float64)
  t, mean_coeff, std, g = _score_sde_kernel(sde, labels)
  assert np.all((t > 1e-3 - 1e-6) & (t < 1.0 + 1e-6)) and len(np.unique(t)) == len(t)
  z = (x_t - mean_coeff[:, None, None] * x) / std[:, None, None]  # the noise the loss drew
  assert 0.5 < z.std() < 2.0
  out = _linear_net_np(x_t, labels, label_scale)
  score = out if isinstance(sde, sde_lib.VESDE) else -out / std[:, None, None]
  if likelihood_weighting:
    per_example = _reduce_np((score + z / std[:, None, None]) ** 2, reduce_mean) * g ** 2
  else:
    per_example = _reduce_np((score * std[:, None, None] + z) ** 2, reduce_mean)
  np.testing.assert_allclose(value, per_example.mean(), rtol=1e-5)


@pytest.mark.parametrize("reduce_mean", [False, True])
def test_smld_loss_equals_score_sde_smld_loss(reduce_mean):
  """get_smld_loss_fn: labels index sigma_max .. sigma_min; sigma^2 (score + noise / sigma^2)^2."""
  sde = sde_lib.VESDE(sigma_min=0.05, sigma_max=5.0, N=10)
  value, (x_t, labels) = _loss_and_inputs(sde, "smld", 10.0, reduce_mean=reduce_mean)
  x = _X.astype(np.float64)
  assert np.all(labels == np.round(labels)) and np.all((labels >= 0) & (labels < sde.N))
  assert len(np.unique(labels)) > 2
  sigmas = np.exp(np.linspace(np.log(sde.sigma_min), np.log(sde.sigma_max), sde.N))[::-1]
  sigmas = sigmas[labels.astype(int)]
  noise = x_t - x
  target = -noise / sigmas[:, None, None] ** 2
  per_example = _reduce_np((_linear_net_np(x_t, labels, 10.0) - target) ** 2,
                           reduce_mean) * sigmas ** 2
  np.testing.assert_allclose(value, per_example.mean(), rtol=1e-5)


@pytest.mark.parametrize("reduce_mean", [False, True])
def test_ddpm_loss_equals_score_sde_ddpm_loss(reduce_mean):
  """get_ddpm_loss_fn: x_i = sqrt(abar_i) x + sqrt(1 - abar_i) noise; (net - noise)^2."""
  sde = sde_lib.VPSDE(N=100)  # betas up to beta_max / N = 0.2
  value, (x_t, labels) = _loss_and_inputs(sde, "ddpm", 100.0, reduce_mean=reduce_mean)
  x = _X.astype(np.float64)
  assert np.all(labels == np.round(labels)) and np.all((labels >= 0) & (labels < sde.N))
  assert len(np.unique(labels)) > 2
  abar = np.cumprod(1.0 - np.linspace(sde.beta_min / sde.N, sde.beta_max / sde.N, sde.N))
  abar = abar[labels.astype(int)][:, None, None]
  noise = (x_t - np.sqrt(abar) * x) / np.sqrt(1.0 - abar)
  per_example = _reduce_np((_linear_net_np(x_t, labels, 100.0) - noise) ** 2, reduce_mean)
  np.testing.assert_allclose(value, per_example.mean(), rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="nope"), "unknown loss 'nope'; valid losses are"),
    (dict(kind="smld", sde=sde_lib.VPSDE()), "SMLD loss is defined for VESDE only"),
    (dict(kind="ddpm", sde=sde_lib.subVPSDE()), "DDPM loss is defined for VPSDE only"),
    (dict(weighting="sigma"), "unknown weighting 'sigma'"),
])
def test_bad_loss_options_raise(kwargs, match):
  sde = kwargs.pop("sde", sde_lib.VPSDE())
  with pytest.raises(ValueError, match=match):
    losses.get_loss_fn(sde, nn.Dense(1), **kwargs)


def test_importance_sampling_needs_likelihood_weighting(mixture):
  with pytest.raises(ValueError, match="importance_sampling is defined for the likelihood weighting"):
    losses.dsm_loss(mixture.score_fn(sde_lib.VPSDE()), sde_lib.VPSDE(), jnp.ones((2, 2)),
                    jax.random.PRNGKey(0), weighting="sigma2", importance_sampling=True)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_log_normal_times_follow_edm_in_log_rho(sde):
  """ln(sigma(t) / alpha(t)) of the drawn t is N(-1.2, 1.2^2) where [eps, T] does not clip it."""
  from scipy import stats
  eps = 1e-5
  t = np.asarray(losses.sample_times(sde, jax.random.PRNGKey(0), 20000, eps,
                                     time_sampling="log_normal"), np.float64)
  assert t.min() >= np.float32(eps) and t.max() <= sde.T
  with jax.enable_x64(True):
    log_rho = np.log(np.asarray(sde.rho(jnp.asarray(t))))
    lo, hi = (float(np.log(sde.rho(jnp.float64(v)))) for v in (eps * 1.001, sde.T * 0.999))
  p_mean, p_std = losses.EDM_LOG_NORMAL
  inside = log_rho[(t > eps * 1.001) & (t < sde.T * 0.999)]
  a, b = (lo - p_mean) / p_std, (hi - p_mean) / p_std
  truncated = stats.truncnorm(a, b, loc=p_mean, scale=p_std)
  assert stats.kstest(inside, truncated.cdf).pvalue > 1e-3
  with pytest.raises(ValueError, match="'beta'.*valid values"):
    losses.sample_times(sde, jax.random.PRNGKey(0), 4, eps, time_sampling="beta")
  with pytest.raises(ValueError, match="cannot be combined"):
    losses.sample_times(sde, jax.random.PRNGKey(0), 4, eps, True, time_sampling="log_normal")
