"""pc with variant='score_sde' against a float64 NumPy loop of score_sde's PC sampler written here
from the paper's equations (App. E-G of Song et al. 2021, as yang-song/score_sde's sampling.py runs
them): same x_T, same noise, the Gaussian-mixture oracle as the score."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracle_flow import CountingScore
from sgm_jax import sampling, sde_lib
from sgm_jax.sampling import pc_score_sde
from test_sampling_pc import GM, SDES, SUBVP, VE, VP  # the same 2-D mixture and SDEs

pytestmark = pytest.mark.usefixtures("fast_compiles")

SHAPE = (5, 2)


# --- the reference: score_sde's pc_sampler, one step at a time in float64 -----------------------
def _marginal_std(kind, sde, t):
  if kind == "ve":
    return sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
  B = sde.beta_min * t + 0.5 * (sde.beta_max - sde.beta_min) * t ** 2
  return np.sqrt(1.0 - np.exp(-B)) if kind == "vp" else 1.0 - np.exp(-B)


def _drift_coefficient_and_g2(kind, sde, t):
  """f(x, t) = c x and g(t)^2 of the forward SDE (Eq. 30, 32, 17 of the paper)."""
  if kind == "ve":
    log_ratio = np.log(sde.sigma_max / sde.sigma_min)
    return 0.0, _marginal_std(kind, sde, t) ** 2 * 2.0 * log_ratio
  beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
  if kind == "vp":
    return -0.5 * beta, beta
  B = sde.beta_min * t + 0.5 * (sde.beta_max - sde.beta_min) * t ** 2
  return -0.5 * beta, beta * (1.0 - np.exp(-2.0 * B))


def reference_pc(kind, sde, n, eps, predictor, corrector, snr, n_each, denoise, probability_flow,
                 score, x_T, noise):
  """x_0 of score_sde's get_pc_sampler with N = n levels; noise(i, slot) is the N(0, I) draw of
  step i (slot 0: predictor, j + 1: corrector step j)."""
  ts = np.linspace(1.0, eps, n)
  sigmas = np.exp(np.linspace(np.log(sde.sigma_min), np.log(sde.sigma_max), n)) if kind == "ve" \
      else None  # SMLD's sigma_0 < ... < sigma_{n-1}
  betas = None if kind == "ve" else \
      sde.beta_min / n + np.arange(n) * (sde.beta_max - sde.beta_min) / (n * (n - 1))  # DDPM's
  w = 0.5 if probability_flow else 1.0
  x = np.asarray(x_T, np.float64)
  x_mean = x
  norm = lambda v: np.mean(np.sqrt(np.sum(v.reshape(v.shape[0], -1) ** 2, axis=1)))
  for i, t in enumerate(ts):
    k = int(np.floor(t * (n - 1) + 1e-9))  # score_sde's int(t (N - 1) / T)
    a = 1.0 if kind == "ve" else 1.0 - betas[k]  # score_sde's alphas[timestep] (VP, sub-VP)
    for j in range(n_each if corrector != "none" else 0):  # the corrector first, at t_i
      g, z = score(x, t), noise(i, j + 1)
      if corrector == "langevin":
        e = (snr * norm(z) / norm(g)) ** 2 * 2.0 * a
      else:
        e = (snr * _marginal_std(kind, sde, t)) ** 2 * 2.0 * a
      x = x + e * g + np.sqrt(2.0 * e) * z
    if predictor == "none":
      x_mean = x
      continue
    s, z = score(x, t), noise(i, 0)
    sigma, below = (sigmas[k], sigmas[k - 1] if k > 0 else 0.0) if kind == "ve" else (None, None)
    if predictor == "euler_maruyama" or (predictor == "reverse_diffusion" and kind == "subvp"):
      c, g2 = _drift_coefficient_and_g2(kind, sde, t)  # dt = 1 / N whatever the grid
      x_mean = x - (c * x - w * g2 * s) / n
      std = np.sqrt(g2 / n)
    elif predictor == "reverse_diffusion" and kind == "ve":
      x_mean = x + w * (sigma ** 2 - below ** 2) * s
      std = np.sqrt(sigma ** 2 - below ** 2)
    elif predictor == "reverse_diffusion":  # VP: f = (sqrt(1 - beta) - 1) x, G = sqrt(beta)
      x_mean = x - (np.sqrt(1.0 - betas[k]) - 1.0) * x + w * betas[k] * s
      std = np.sqrt(betas[k])
    elif kind == "ve":  # SMLD ancestral step
      x_mean = x + (sigma ** 2 - below ** 2) * s
      std = np.sqrt(below ** 2 * (sigma ** 2 - below ** 2) / sigma ** 2)
    else:  # DDPM ancestral step
      x_mean = (x + betas[k] * s) / np.sqrt(1.0 - betas[k])
      std = np.sqrt(betas[k])
    x = x_mean + (0.0 if probability_flow else std) * z
  return x_mean if denoise else x


def run_both(kind, sde, num_steps, options, dtype=jnp.float64, seed=0):
  """(sampler output, nfe, reference output) on the same x_T and noise."""
  key = jax.random.PRNGKey(seed)
  with jax.enable_x64(True):
    gm = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if a.dtype.kind == "f" else a, GM)
    score_fn = gm.score_fn(sde)
    x_T = sde.prior_sampling(jax.random.PRNGKey(seed + 100), SHAPE).astype(jnp.float64)
    sampler = sampling.get_sampler("pc", sde, SHAPE, num_steps=num_steps, variant="score_sde",
                                   **options)
    x, nfe = sampler(key, score_fn, x_T.astype(dtype))
    # The noise of the sampler: base.initial_state splits the key, base.step_normal folds in the
    # step and the slot.
    key_steps = jax.random.split(key)[1]
    noise = lambda i, slot: np.asarray(jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(key_steps, i), slot), SHAPE, dtype), np.float64)
    score = lambda x, t: np.asarray(
        score_fn(jnp.asarray(x, dtype), jnp.full((SHAPE[0],), t, dtype)), np.float64)
    ref = reference_pc(kind, sde, num_steps, options.get("eps", sde.default_sampling_eps),
                       options.get("predictor", "reverse_diffusion"),
                       options.get("corrector", "langevin"), options.get("snr", 0.16),
                       options.get("n_steps_each", 1), options.get("denoise", True),
                       options.get("probability_flow", False), score, x_T, noise)
  return np.asarray(x, np.float64), int(nfe), ref


CASES = [  # (sde, num_steps, options): every predictor and corrector of score_sde, its configs
    ("ve", 25, dict()),  # NCSN++ / VE configs: reverse diffusion + Langevin, noise removal
    ("vp", 25, dict(n_steps_each=2, snr=0.2)),
    ("vp", 25, dict(predictor="ancestral_sampling", corrector="langevin", denoise=False)),
    ("ve", 25, dict(predictor="ancestral_sampling", corrector="ald", n_steps_each=2)),
    ("ve", 12, dict(predictor="none", corrector="ald", n_steps_each=3, snr=0.1)),  # NCSNv2
    ("subvp", 25, dict(predictor="euler_maruyama", corrector="none")),  # sub-VP configs
    ("subvp", 25, dict(predictor="reverse_diffusion", corrector="langevin")),
    ("vp", 25, dict(predictor="euler_maruyama", corrector="none", probability_flow=True)),
    ("ve", 25, dict(predictor="reverse_diffusion", corrector="none", eps=0.03)),  # k != N-1-i
]
IDS = [f"{s}-{n}-" + "-".join(f"{k}={v}" for k, v in o.items()) for s, n, o in CASES]


@pytest.mark.parametrize("kind,num_steps,options", CASES, ids=IDS)
def test_equals_the_reference_loop(kind, num_steps, options):
  x, nfe, ref = run_both(kind, SDES[kind], num_steps, options)
  scale = np.max(np.abs(ref))
  np.testing.assert_allclose(x, ref, rtol=1e-9, atol=1e-9 * scale)
  per_step = (options.get("predictor") != "none") + (
      options.get("n_steps_each", 1) if options.get("corrector") != "none" else 0)
  assert nfe == num_steps * per_step


def test_float32_run_is_the_reference_to_rounding():
  x, _, ref = run_both("ve", VE, 25, dict(n_steps_each=2), dtype=jnp.float32)
  np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options,per_step", [
    (dict(), 2),  # noise removal costs no evaluation
    (dict(n_steps_each=3, corrector="ald"), 4),
    (dict(predictor="none", corrector="ald", n_steps_each=2), 2),
    (dict(corrector="none"), 1),
])
def test_nfe_is_what_runs(options, per_step):
  sampler = sampling.get_sampler("pc", VE, SHAPE, num_steps=6, variant="score_sde", **options)
  score = CountingScore(GM.score_fn(VE))
  x, nfe = sampler(jax.random.PRNGKey(0), score)
  jax.effects_barrier()
  assert int(nfe) == score.count == sampler.info["nfe"] == 6 * per_step
  assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize("kind", ["ve", "vp"])
def test_differs_from_the_default_pc(kind):
  """Same key, x_T and options: the default pc's order, grid, kernels and Tweedie denoising give
  other samples (by far more than rounding)."""
  sde = SDES[kind]
  x_T = sde.prior_sampling(jax.random.PRNGKey(1), SHAPE)
  out = {}
  for variant in ("default", "score_sde"):
    sampler = sampling.get_sampler("pc", sde, SHAPE, num_steps=25, variant=variant, denoise=True)
    out[variant], _ = sampler(jax.random.PRNGKey(0), GM.score_fn(sde), x_T)
  assert float(jnp.max(jnp.abs(out["default"] - out["score_sde"]))) > 0.05


@pytest.mark.parametrize("num_scales", [1000, 232, 10])  # score_sde's NCSN++, NCSNv2, NCSN
def test_discrete_ve_labels_name_the_predictors_sigma(num_scales):
  """With the default number of steps (num_steps = N), the integer label of a discrete VE network
  (round((T - t)(N - 1)) into its sigmas, sigma_max first) and the level the predictor steps from
  are the same sigma at every step.

  A score of ones and a hook that records and zeros x show the predictor's own step: with
  probability_flow it adds (sigma_k^2 - sigma_{k-1}^2) / 2 to x = 0."""
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=num_scales)
  sampler = sampling.get_sampler("pc", sde, (1, 1), num_steps=sde.N, variant="score_sde",
                                 predictor="reverse_diffusion", corrector="none",
                                 probability_flow=True, denoise=False)
  times, steps = [], []

  def score(x, t):
    jax.debug.callback(lambda t: times.append(np.asarray(t)[0]), t)
    return jnp.ones_like(x)

  def hook(x, t, key):
    jax.debug.callback(lambda x: steps.append(float(np.asarray(x)[0, 0])), x)
    return jnp.zeros_like(x)

  sampler(jax.random.PRNGKey(0), score, jnp.zeros((1, 1)), hook=hook)
  jax.effects_barrier()
  labels = np.asarray(sde.time_label(jnp.asarray(np.array(times), jnp.float32), continuous=False))
  with jax.enable_x64(True):  # what the network indexes with its label
    network_sigmas = np.asarray(sde_lib.smld_sigmas(sde.sigma_min, sde.sigma_max, sde.N))
  np.testing.assert_array_equal(labels, np.arange(sde.N))
  np.testing.assert_array_equal(sde.N - 1 - sampler.info["timesteps"], labels)
  below = np.append(network_sigmas[labels[:-1] + 1], 0.0)
  np.testing.assert_allclose(steps, 0.5 * (network_sigmas[labels] ** 2 - below ** 2), rtol=2e-6)


def test_hook_holds_in_the_denoised_output_and_identity_hook_changes_nothing():
  sampler = sampling.get_sampler("pc", VE, SHAPE, num_steps=6, variant="score_sde",
                                 n_steps_each=2)
  times = []

  def zero_first(x, t, key):
    jax.debug.callback(lambda t: times.append(float(t)), t)
    return x.at[:, 0].set(0.0)

  x_T = VE.prior_sampling(jax.random.PRNGKey(1), SHAPE)
  x, _ = sampler(jax.random.PRNGKey(0), GM.score_fn(VE), x_T, hook=zero_first)
  jax.effects_barrier()
  np.testing.assert_array_equal(np.asarray(x)[:, 0], 0.0)
  ts = sampler.info["ts"]
  expected = np.concatenate([np.repeat(ts, 2), ts[1:], [0.0]])  # correctors at t_i, predictor after
  np.testing.assert_allclose(sorted(times, reverse=True), np.sort(expected)[::-1], rtol=1e-6)
  plain, _ = sampler(jax.random.PRNGKey(0), GM.score_fn(VE), x_T)
  hooked, _ = sampler(jax.random.PRNGKey(0), GM.score_fn(VE), x_T, hook=lambda x, t, key: x)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(hooked))


@pytest.mark.parametrize("sde,options,match", [
    (VP, dict(variant="song"),
     r"unknown variant 'song'; valid values are \['default', 'score_sde'\]"),
    (VP, dict(variant="score_sde", time_grid="uniform"), "valid options are .*'snr'"),
    (VP, dict(variant="score_sde", eps=0.0), r"eps must be a float in \(0, T=1.0\)"),
    (SUBVP, dict(variant="score_sde", predictor="ancestral"), "undefined for subVPSDE"),
    (sde_lib.TutorialSDE(), dict(variant="score_sde", predictor="ancestral"),
     "needs discrete levels"),
    (VP, dict(variant="score_sde", predictor="none", corrector="none"), "both be 'none'"),
    (VP, dict(variant="score_sde", predictor="ancestral"), "betas reach beta_max / num_steps"),
])
def test_bad_options_raise(sde, options, match):
  with pytest.raises(ValueError, match=match):
    sampling.get_sampler("pc", sde, SHAPE, num_steps=4, **options)


def test_levels_follow_num_steps():
  """num_steps = n discretizes on n levels, as score_sde with model.num_scales = n: the same
  coefficients as an SDE built with N = n."""
  ts = pc_score_sde.score_sde_grid(VP, 30, None)
  a = pc_score_sde.predictor_coefficients(sde_lib.VPSDE(N=30), "ancestral", ts, False)
  b = sampling.get_sampler("pc", VP, SHAPE, num_steps=30, variant="score_sde").info
  np.testing.assert_array_equal(b["timesteps"], np.arange(30)[::-1])
  betas = np.linspace(0.1 / 30, 20.0 / 30, 30)
  np.testing.assert_allclose(a["C"] ** 2, betas[::-1], rtol=1e-12)


def test_the_paper_configs_sample_pc_with_score_sde_loop_and_the_small_ones_do_not():
  import importlib
  from sgm_jax.cli import setup
  for module in ("configs.ve.cifar10_ncsnpp_continuous", "configs.vp.cifar10_ddpmpp_continuous",
                 "configs.ve.celeba_ncsnpp", "configs.ve.ffhq_ncsnpp_continuous"):
    config = importlib.import_module(module).get_config()
    options = setup.sampler_options_from_config(config, "pc", {})
    assert options["variant"] == "score_sde" and options["denoise"] is True, module
    assert setup.sampler_options_from_config(config, "pc", {"variant": "default"})["variant"] == \
        "default"  # --sampler_option variant=default
    assert "variant" not in setup.sampler_options_from_config(config, "deis", {})
  small = importlib.import_module("configs.fashion_mnist").get_config()
  assert "variant" not in setup.sampler_options_from_config(small, "pc", {})
