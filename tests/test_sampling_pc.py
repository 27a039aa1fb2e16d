"""Predictor-corrector samplers on the Gaussian-mixture oracle: distributions, invariance, nfe."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from oracle_flow import CountingScore
from sgm_jax import sampling, sde_lib, toy
from sgm_jax.sampling import pc

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

# A 2-D mixture with unequal weights and stds: small enough for many samples and steps.
GM = toy.GaussianMixture.create(jnp.array([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]),
                                jnp.array([0.3, 0.4, 0.35]), jnp.array([0.5, 0.3, 0.2]))
VE = sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0)
VP = sde_lib.VPSDE()
SUBVP = sde_lib.subVPSDE()
SDES = {"ve": VE, "vp": VP, "subvp": SUBVP}
N_SAMPLES = 4000
Z = 5.0  # tolerance in standard errors


def assert_matches_oracle(x, sde, t, z=Z):
  """Per-dimension mean and variance and the mixture weights (mean responsibilities) of the
  samples x against p_t, within z standard errors."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  mean, var = (np.asarray(m, np.float64) for m in GM.moments(sde, t))
  # Exact 4th central moment per dimension: sum_k w_k E[(d_k + sqrt(v_k) z)^4], d_k = mu_k' - mean.
  alpha, sigma = float(sde.alpha(jnp.asarray(t))), float(sde.sigma(jnp.asarray(t)))
  d = alpha * np.asarray(GM.means, np.float64) - mean
  v = ((alpha * np.asarray(GM.stds, np.float64)) ** 2 + sigma ** 2)[:, None]
  mu4 = np.asarray(GM.weights, np.float64) @ (d ** 4 + 6 * d ** 2 * v + 3 * v ** 2)
  se_mean, se_var = np.sqrt(var / n), np.sqrt((mu4 - var ** 2) / n)
  z_mean = np.abs(x.mean(0) - mean) / se_mean
  z_var = np.abs(x.var(0) - var) / se_var
  w = np.asarray(GM.weights, np.float64)
  resp = np.asarray(GM.responsibilities(jnp.asarray(x, jnp.float32), sde, jnp.full((n,), t)))
  z_w = np.abs(resp.mean(0) - w) / np.sqrt(w * (1 - w) / n)
  msg = f"z-scores: mean {z_mean}, var {z_var}, weights {z_w}"
  assert np.all(z_mean < z) and np.all(z_var < z) and np.all(z_w < z), msg


STOCHASTIC = [
    ("vp", 400, dict(predictor="euler_maruyama", corrector="none")),
    ("ve", 200, dict(predictor="reverse_diffusion", corrector="langevin")),
    ("vp", 400, dict(predictor="ancestral", corrector="none")),
    ("ve", 400, dict(predictor="ancestral", corrector="none", denoise=True)),
    ("subvp", 200, dict(predictor="euler_maruyama", corrector="ald", snr=0.1)),
    ("vp", 200, dict(predictor="euler_maruyama", corrector="none", probability_flow=True)),
]


@pytest.mark.parametrize("sde_name,num_steps,options", STOCHASTIC,
                         ids=[f"{s}-{o['predictor']}-{o['corrector']}" for s, _, o in STOCHASTIC])
def test_samples_match_the_oracle_distribution(sde_name, num_steps, options):
  sde = SDES[sde_name]
  sampler = sampling.get_sampler("pc", sde, (N_SAMPLES, 2), num_steps=num_steps, **options)
  x, _ = sampler(jax.random.PRNGKey(0), GM.score_fn(sde))
  assert_matches_oracle(x, sde, float(sampler.info["ts"][-1]))


@pytest.mark.parametrize("corrector", ["langevin", "ald"])
def test_corrector_alone_keeps_p_t_invariant(corrector):
  """Start from exact samples of p_t, run 200 corrector steps at fixed t: p_t is unchanged."""
  sde, t = VP, 0.5
  score_fn = GM.score_fn(sde)
  x0 = GM.sample(jax.random.PRNGKey(1), N_SAMPLES, sde, t)
  sigma_t = sde.sigma(jnp.asarray(t))

  def step(x, i):
    z = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(2), i), x.shape)
    if corrector == "langevin":
      return pc.langevin_step(score_fn, x, jnp.asarray(t), z, snr=0.16), None
    return pc.ald_step(score_fn, x, jnp.asarray(t), z, snr=0.16, sigma=sigma_t), None

  x, _ = jax.jit(lambda x: lax.scan(step, x, jnp.arange(200)))(x0)
  assert float(jnp.mean(jnp.abs(x - x0))) > 0.1  # the chain moved
  assert_matches_oracle(x, sde, t)


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("num_steps", [1, 2])
def test_finite_and_nfe_exact_in_float32(sde_name, num_steps):
  """Few steps stay finite; nfe equals the score evaluations counted at run time."""
  sde = SDES[sde_name]
  sampler = sampling.get_sampler("pc", sde, (3, 2), num_steps=num_steps, n_steps_each=2,
                                 denoise=True)
  score = CountingScore(GM.score_fn(sde))
  x, nfe = score.run(sampler, jax.random.PRNGKey(0))
  assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))
  assert nfe.dtype == jnp.int32 and int(nfe) == score.count == num_steps * 3 + 1


@pytest.mark.parametrize("options,per_step", [
    (dict(predictor="none", corrector="ald", n_steps_each=3), 3),
    (dict(predictor="ancestral", corrector="none"), 1),
    (dict(predictor="euler_maruyama", corrector="langevin", probability_flow=True), 2),
])
def test_nfe_counts_only_what_runs(options, per_step):
  sampler = sampling.get_sampler("pc", VP, (3, 2), num_steps=4, **options)
  score = CountingScore(GM.score_fn(VP))
  x, nfe = score.run(sampler, jax.random.PRNGKey(0), jnp.ones((3, 2)))
  assert int(nfe) == score.count == 4 * per_step
  assert bool(jnp.all(jnp.isfinite(x)))


def test_probability_flow_predictor_is_a_pure_function_of_x_T():
  sampler = sampling.get_sampler("pc", VE, (3, 2), num_steps=5, predictor="euler_maruyama",
                                 corrector="none", probability_flow=True)
  x_T = 10.0 * jax.random.normal(jax.random.PRNGKey(5), (3, 2))
  score_fn = GM.score_fn(VE)
  a, _ = sampler(jax.random.PRNGKey(0), score_fn, x_T)
  b, _ = sampler(jax.random.PRNGKey(1), score_fn, x_T)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c, _ = sampler(jax.random.PRNGKey(0), score_fn, x_T + 1.0)
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_stochastic_predictor_uses_the_key():
  sampler = sampling.get_sampler("pc", VP, (3, 2), num_steps=3, corrector="none")
  x_T = jnp.ones((3, 2))
  a, _ = sampler(jax.random.PRNGKey(0), GM.score_fn(VP), x_T)
  b, _ = sampler(jax.random.PRNGKey(1), GM.score_fn(VP), x_T)
  assert not np.allclose(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("options,match", [
    (dict(predictor="heun"), "valid values are .*'ancestral'.*'euler_maruyama'"),
    (dict(corrector="hmc"), "valid values are .*'ald'.*'langevin'.*'none'"),
    (dict(stepsize=0.1), "valid options are .*'n_steps_each'.*'snr'"),
    (dict(snr=-0.1), "snr"),
    (dict(n_steps_each=0), "n_steps_each"),
    (dict(time_grid="cosine"), "valid values are .*'log_rho'.*'uniform'"),
    (dict(predictor="none", corrector="none"), "both be 'none'"),
    (dict(predictor="ancestral", probability_flow=True), "probability_flow"),
])
def test_bad_options_raise_listing_valid_ones(options, match):
  with pytest.raises(ValueError, match=match):
    sampling.get_sampler("pc", VP, (3, 2), num_steps=4, **options)


# score_sde's sampling.py names -> this project's (the same otherwise)
SCORE_SDE_PREDICTORS = {"euler_maruyama": "euler_maruyama", "ancestral_sampling": "ancestral",
                        "reverse_diffusion": "reverse_diffusion", "none": "none"}
SCORE_SDE_CORRECTORS = ("langevin", "ald", "none")


@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_score_sde_names_are_the_same_updates(sde_name):
  """score_sde's predictor and corrector names (sampling.py) build the update of the same math
  here: the same samples from the same key as this project's name."""
  sde = SDES[sde_name]
  score_fn = GM.score_fn(sde)
  for predictor in SCORE_SDE_PREDICTORS:
    for corrector in SCORE_SDE_CORRECTORS:
      if predictor == corrector == "none":
        continue
      alias = sampling.get_sampler("pc", sde, (3, 2), num_steps=3, predictor=predictor,
                                   corrector=corrector)
      name = SCORE_SDE_PREDICTORS[predictor]
      assert alias.info["predictor"] == name and name in pc.PREDICTORS
      assert alias.info["corrector"] == corrector and corrector in pc.CORRECTORS
      if name == predictor or corrector != "none":
        continue
      same = sampling.get_sampler("pc", sde, (3, 2), num_steps=3, predictor=name,
                                  corrector=corrector)
      a, nfe_a = alias(jax.random.PRNGKey(0), score_fn)
      b, nfe_b = same(jax.random.PRNGKey(0), score_fn)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert int(nfe_a) == int(nfe_b)


def test_unknown_names_list_the_aliases_too():
  with pytest.raises(ValueError, match=r"unknown predictor 'ancestral_samples'; valid values are "
                                       r"\['ancestral', 'ancestral_sampling', 'euler_maruyama', "
                                       r"'none', 'reverse_diffusion'\]"):
    sampling.get_sampler("pc", VP, (3, 2), num_steps=4, predictor="ancestral_samples")
  with pytest.raises(ValueError, match=r"unknown corrector 'Langevin'; valid values are "
                                       r"\['ald', 'langevin', 'none'\]"):
    sampling.get_sampler("pc", VP, (3, 2), num_steps=4, corrector="Langevin")
  with pytest.raises(ValueError, match="probability_flow"):
    sampling.get_sampler("pc", VP, (3, 2), num_steps=4, predictor="ancestral_sampling",
                         probability_flow=True)


def test_ancestral_is_undefined_for_sub_vp():
  with pytest.raises(ValueError, match="undefined for subVPSDE"):
    sampling.get_sampler("pc", SUBVP, (3, 2), num_steps=4, predictor="ancestral")
  # ... but defined where alpha = 1, as for the tutorial SDE.
  sampler = sampling.get_sampler("pc", sde_lib.TutorialSDE(), (3, 2), num_steps=2,
                                 predictor="ancestral", corrector="none")
  x, _ = sampler(jax.random.PRNGKey(0), GM.score_fn(sde_lib.TutorialSDE()))
  assert bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
def test_step_coefficients_against_the_kernel(sde_name):
  """The log-SNR forms of the step coefficients equal the direct kernel formulas: forward step
  variance sigma_t^2 - a^2 sigma_s^2 (SMLD's sigma_t^2 - sigma_s^2 for VE), posterior variance
  sigma_s^2 G^2 / sigma_t^2, DDPM's beta = 1 - a^2."""
  sde = SDES[sde_name]
  ts = sampling.base.sampling_grid(sde, "uniform", 7, None)
  alpha, sigma, lam = (sampling.base.on_host(f, ts) for f in (sde.alpha, sde.sigma, sde.log_snr))
  c = pc._step_coefficients(alpha, sigma, lam)
  a = alpha[:-1] / alpha[1:]
  G2 = sigma[:-1] ** 2 - a ** 2 * sigma[1:] ** 2
  np.testing.assert_allclose(c["a"], a, rtol=1e-12)
  np.testing.assert_allclose(c["G2"], G2, rtol=1e-9)
  np.testing.assert_allclose(c["P"], sigma[1:] ** 2 * G2 / sigma[:-1] ** 2, rtol=1e-9)
  np.testing.assert_allclose(c["beta"], 1 - a ** 2, rtol=1e-9, atol=1e-15)
