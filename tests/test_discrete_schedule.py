"""DiscreteVPSchedule (sgm_jax/discrete_schedule.py) and score.score_fn_from_model against closed
forms: DDPM's and diffusers' alphas_cumprod at the training steps, the continuous limit of a VP
SDE sampled at t_n = (n + 1) / N, the exact oracle behind eps / x0 / v outputs, and every sampler
on a discrete schedule against the same sampler on the equivalent VPSDE."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import likelihood, sampling, score, sde_lib, toy
from sgm_jax.discrete_schedule import DiscreteVPSchedule as Schedule
from sgm_jax.errors import InputError

pytestmark = pytest.mark.usefixtures("fast_compiles")

N = 1000
GM = toy.GaussianMixture.create(jnp.array([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]),
                                jnp.array([0.3, 0.4, 0.35]), jnp.array([0.5, 0.3, 0.2]))
INTERPOLATIONS = ("cubic", "linear")


def steps_t(n=N):
  """t_n = (n + 1) / N of the N training steps, float64."""
  return np.arange(1, n + 1, dtype=np.float64) / n


def f64(a):
  return np.asarray(a, np.float64)


def gm64():
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) if a.dtype.kind == "f" else a,
                                GM)


# --- the training steps: closed forms of DDPM / diffusers ---------------------------------------
# diffusers' DDPMScheduler, written out: 'linear', 'scaled_linear' and 'squaredcos_cap_v2'.
def ddpm_linear_betas(n=N, start=1e-4, end=0.02):
  return np.linspace(start, end, n, dtype=np.float64)


def scaled_linear_betas(n=N, start=0.00085, end=0.012):
  return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2


def cosine_betas(n=N, max_beta=0.999):
  alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("build,betas", [
    (Schedule.linear, ddpm_linear_betas), (Schedule.scaled_linear, scaled_linear_betas),
    (Schedule.cosine, cosine_betas)])
def test_training_steps_reproduce_alphas_cumprod(build, betas, interpolation):
  """alpha(t_n)^2 = prod_{m <= n} (1 - beta_m) and sigma(t_n)^2 = 1 - that, in float64, at
  t_n = (n + 1) / N, whose time label is the step n; DDPM's betas come back too."""
  sched = build(interpolation=interpolation)
  ac = np.cumprod(1.0 - betas())
  with jax.enable_x64(True):
    t = jnp.asarray(steps_t())
    np.testing.assert_allclose(f64(sched.alpha(t)) ** 2, ac, rtol=1e-12)
    np.testing.assert_allclose(f64(sched.sigma(t)) ** 2, 1.0 - ac, rtol=1e-10)
    np.testing.assert_allclose(f64(sched.alphas_cumprod), ac, rtol=1e-12)
    np.testing.assert_allclose(f64(sched.discrete_betas), betas(), rtol=1e-9)
    np.testing.assert_allclose(f64(sched.time_label(t)), np.arange(N), atol=1e-9)
    np.testing.assert_allclose(f64(sched.t_from_timestep(jnp.arange(N))), steps_t(), rtol=1e-15)
    np.testing.assert_array_equal(np.asarray(sched.timestep(t)), np.arange(N))
  assert sched.N == N and sched.default_sampling_eps == 1.0 / N
  assert float(sched.alpha(0.0)) == 1.0 and float(sched.sigma(0.0)) == 0.0


def test_training_steps_in_float32():
  """In float32 the steps are kept to float32 precision, and t_n rounded to float32 still maps to
  step n (discretize's DDPM step)."""
  sched = Schedule.linear()
  ac = np.cumprod(1.0 - ddpm_linear_betas())
  t = (jnp.arange(N, dtype=jnp.float32) + 1.0) / N
  assert sched.alpha(t).dtype == jnp.float32
  np.testing.assert_allclose(f64(sched.alpha(t)) ** 2, ac, rtol=3e-6)
  np.testing.assert_array_equal(np.asarray(sched.timestep(t)), np.arange(N))
  x = jnp.ones((N, 2), jnp.float32)
  f, G = sched.discretize(x, t)  # DDPM: x_n = sqrt(1 - beta_n) x_{n-1} + sqrt(beta_n) z
  np.testing.assert_allclose(f64(G), np.sqrt(ddpm_linear_betas()), rtol=1e-5)
  np.testing.assert_allclose(f64(f[:, 0]), np.sqrt(1 - ddpm_linear_betas()) - 1, atol=2e-7)


def test_constructors_agree():
  """from_betas, from_alphas_cumprod, the named schedules, a diffusers config and from_sde of a
  VPSDE built from the same betas are the same schedule."""
  betas = ddpm_linear_betas()
  a = Schedule.from_betas(betas)
  b = Schedule.from_alphas_cumprod(np.cumprod(1.0 - betas))
  np.testing.assert_allclose(a.log_alphas_cumprod, b.log_alphas_cumprod, rtol=1e-12)
  with jax.enable_x64(True):
    t = jnp.linspace(0.0, 1.0, 4097)
    for f in ("alpha", "sigma", "beta"):
      np.testing.assert_allclose(f64(getattr(a, f)(t)), f64(getattr(b, f)(t)), rtol=1e-9)
  assert a == Schedule.linear() == Schedule.from_diffusers_config(
      {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": N})
  assert Schedule.from_diffusers_config({"trained_betas": list(betas)}) == a
  assert Schedule.from_diffusers_config({"beta_schedule": "scaled_linear"}) == \
      Schedule.scaled_linear()
  assert Schedule.from_diffusers_config({"beta_schedule": "squaredcos_cap_v2"}) == \
      Schedule.cosine()
  # DDPM's own discretization of the VP SDE: beta_n = beta(t) / N on a uniform grid.
  vp = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=N)
  np.testing.assert_allclose(f64(vp.discrete_betas), betas, rtol=1e-6)


def test_hashable_static_argument():
  """Equal schedules hash equal, so a sampler's jitted helpers reuse their compilation."""
  a, b = Schedule.linear(), Schedule.linear()
  assert a == b and hash(a) == hash(b) and a != Schedule.linear(interpolation="linear")
  assert "N=1000" in repr(a) and len(repr(a)) < 200
  f = jax.jit(lambda s, t: s.sigma(t), static_argnums=0)
  np.testing.assert_allclose(float(f(a, 0.5)), float(b.sigma(0.5)))
  assert isinstance(a, sde_lib.VPSDE)


# --- the continuous limit: a VPSDE sampled at the steps -----------------------------------------
VP = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=N)


def test_linear_interpolation_of_a_vpsde_in_closed_form():
  """From VPSDE's own alpha(t_n)^2, 'linear' interpolates B(t) = 0.1 t + 9.95 t^2 linearly between
  the knots k / N (B(0) = 0 included), so B_disc - B = c (t - t_k)(t_{k+1} - t), c = 9.95 (at most
  2.5e-6), and beta_disc is beta at the middle of each step: exact identities, on all of [0, 1]."""
  sched = Schedule.from_sde(VP, N, interpolation="linear")
  with jax.enable_x64(True):
    t = np.random.default_rng(0).uniform(0.0, 1.0, 20_000)
    lo, hi = np.floor(t * N) / N, (np.floor(t * N) + 1) / N
    c = 0.5 * (VP.beta_max - VP.beta_min)
    np.testing.assert_allclose(f64(sched.integrated_beta(t)) - f64(VP.integrated_beta(t)),
                               c * (t - lo) * (hi - t), rtol=1e-6, atol=2e-14)
    # beta is constant on each step (t_{k-1}, t_k]; a knot (to 1e-4 of a step) is on the step below.
    mid = (np.ceil(t * N - 1e-4) - 0.5) / N
    np.testing.assert_allclose(f64(sched.beta(t)), f64(VP.beta(mid)), rtol=1e-9)
    drift, diffusion = sched.sde(jnp.ones((t.size, 1)), jnp.asarray(t))
    np.testing.assert_allclose(f64(drift[:, 0]), -0.5 * f64(VP.beta(mid)), rtol=1e-9)
    np.testing.assert_allclose(f64(diffusion) ** 2, f64(VP.beta(mid)), rtol=1e-9)


def test_cubic_interpolation_of_a_vpsde_is_close():
  """The default monotone cubic is closer still: |B_disc - B| <= 2e-7 (the linear one's bound is
  2.5e-6), alpha to 1e-7, sigma to 1e-3 relative (its worst case is in (0, 1/N], sigma < 0.01);
  beta(t), now continuous, within (delta beta)^2 / (4 beta_min) = 1e-3 of the VPSDE's (the
  harmonic-mean knot slopes of PCHIP), and drift and diffusion with it."""
  sched = Schedule.from_sde(VP, N)
  with jax.enable_x64(True):
    t = np.linspace(0.0, 1.0, 200_001)[1:]
    assert np.abs(f64(sched.integrated_beta(t)) - f64(VP.integrated_beta(t))).max() < 2e-7
    np.testing.assert_allclose(f64(sched.alpha(t)), f64(VP.alpha(t)), rtol=1e-7)
    np.testing.assert_allclose(f64(sched.sigma(t)), f64(VP.sigma(t)), rtol=1e-3)
    np.testing.assert_allclose(f64(sched.log_snr(t)), f64(VP.log_snr(t)), atol=2e-3)
    assert np.abs(f64(sched.beta(t)) - f64(VP.beta(t))).max() < 1e-3
    x = jnp.full((t.size, 1), 2.0)
    (drift, diffusion), (drift_vp, diffusion_vp) = sched.sde(x, t), VP.sde(x, t)
    assert np.abs(f64(drift - drift_vp)).max() < 1e-3
    assert np.abs(f64(diffusion ** 2 - diffusion_vp ** 2)).max() < 1e-3


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_log_snr_inverse(interpolation):
  """t_from_log_snr inverts log_snr (and t_from_rho rho) on [1e-4, 1], including the knots."""
  sched = Schedule.cosine(interpolation=interpolation)
  with jax.enable_x64(True):
    t = np.concatenate([np.linspace(1e-4, 1.0, 5001), steps_t()])
    np.testing.assert_allclose(f64(sched.t_from_log_snr(sched.log_snr(t))), t, rtol=1e-10)
    np.testing.assert_allclose(f64(sched.t_from_rho(sched.rho(t))), t, rtol=1e-10)


def test_beta_is_the_derivative_of_the_kernel():
  """f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2, by central differences of alpha
  and sigma themselves, inside the steps (cosine schedule, both interpolations)."""
  for interpolation in INTERPOLATIONS:
    sched = Schedule.cosine(interpolation=interpolation)
    with jax.enable_x64(True):
      t = (np.arange(3, N - 3, 7) + 0.37) / N
      h = 1e-7
      f = (np.log(f64(sched.alpha(t + h))) - np.log(f64(sched.alpha(t - h)))) / (2 * h)
      dvar = (f64(sched.sigma(t + h)) ** 2 - f64(sched.sigma(t - h)) ** 2) / (2 * h)
      drift, g = sched.sde(jnp.ones((t.size, 1)), jnp.asarray(t))
      np.testing.assert_allclose(f64(drift[:, 0]), f, rtol=1e-5)
      np.testing.assert_allclose(f64(g) ** 2, dvar - 2 * f * f64(sched.sigma(t)) ** 2, rtol=1e-5)


# --- network outputs -> score ---------------------------------------------------------------------
def oracle_network(sched, gm, prediction):
  """apply_fn(x, timestep) of a perfectly trained network: the oracle at t = (timestep + 1) / N."""
  def apply_fn(x, timestep):
    t = sched.t_from_timestep(timestep)
    eps, x0 = gm.eps(x, sched, t), gm.denoise(x, sched, t)
    alpha, sigma = (sde_lib.batch_expand(f(t), x) for f in (sched.alpha, sched.sigma))
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]
  return apply_fn


@pytest.mark.parametrize("prediction,kind", [
    ("epsilon", "eps"), ("eps", "eps"), ("sample", "x0"), ("x0", "x0"),
    ("v_prediction", "v"), ("v", "v")])
def test_outputs_give_the_oracle_score(prediction, kind):
  """eps, x0 and v outputs of the exact oracle (diffusers' names and ours) become the oracle's own
  score to 1e-9 relative in float64, at the training steps and between them."""
  sched = Schedule.linear()
  with jax.enable_x64(True):
    gm = gm64()
    key_x, key_t = jax.random.split(jax.random.PRNGKey(0))
    t = jnp.concatenate([jnp.asarray(steps_t()[::50]),
                         jax.random.uniform(key_t, (20,), jnp.float64, 1.0 / N, 1.0)])
    x = gm.sample(key_x, t.size, sched, t)
    score_fn = score.score_fn_from_model(sched, oracle_network(sched, gm, kind), prediction)
    expected = gm.score(x, sched, t)
    got = jax.jit(score_fn)(x, t)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(f64(got), f64(expected), rtol=1e-9,
                               atol=1e-9 * float(jnp.abs(expected).max()))


def test_model_timesteps_and_traced_parameters():
  """apply_fn sees timestep t N - 1; passed as a Partial its parameters are traced (new values
  reuse the compiled sampler)."""
  sched = Schedule.linear()
  seen = []
  score_fn = score.score_fn_from_model(sched, lambda x, n: (seen.append(n), x)[1], "epsilon")
  score_fn(jnp.ones((3, 2)), jnp.array([1.0 / N, 0.5, 1.0]))
  np.testing.assert_allclose(np.asarray(seen[0]), [0.0, 499.0, 999.0], atol=1e-4)

  def scaled_oracle(scale, x, timestep):
    return scale * oracle_network(sched, GM, "eps")(x, timestep)
  sampler = sampling.get_sampler("ddim", sched, (8, 2), num_steps=5)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
  run = lambda s: sampler(jax.random.PRNGKey(1), score.score_fn_from_model(
      sched, jax.tree_util.Partial(scaled_oracle, jnp.float32(s))), x_T)[0]
  before = sampler._run._cache_size()
  x1, x2 = run(1.0), run(0.5)
  assert sampler._run._cache_size() == before + 1
  assert not np.allclose(np.asarray(x1), np.asarray(x2))


# --- every sampler --------------------------------------------------------------------------------
# Max |x_disc - x_vp| over the batch, same x_T and key, 20 steps: the schedule differs from the
# VPSDE by 1e-7 in alpha, so exact integrators agree to float32 round-off; the adaptive ODE to its
# rtol of 1e-5 and Euler-Maruyama (milstein) to beta's 1e-3 times its step.
SAMPLER_TOL = {"ode": 1e-3, "milstein": 2e-4}
SAMPLER_OPTIONS = {"deis_rhoab": ("deis", {"method": "rhoab"}),
                   "deis_rhork": ("deis", {"method": "rhork"}),
                   "pc_ancestral": ("pc", {"predictor": "ancestral", "corrector": "none"})}
# deis (method 'tab') integrates its coefficients in log rho without g, so the kinks of beta(t) at
# every training step do not reach it (deis_coefficients.exponential_ab_coefficients).


def sampler_cases():
  for name in sampling.SAMPLERS:
    yield pytest.param(name, name, {}, id=name)
  for label, (name, options) in SAMPLER_OPTIONS.items():
    yield pytest.param(label, name, options, id=label)


@pytest.mark.parametrize("label,name,options", list(sampler_cases()))
def test_every_sampler_matches_the_vpsde(label, name, options):
  sched = Schedule.from_sde(VP, N)
  key, x_T = jax.random.PRNGKey(0), jax.random.normal(jax.random.PRNGKey(1), (64, 2))
  samplers = [(sampling.get_sampler(name, sde, (64, 2), num_steps=20, **options), GM.score_fn(sde))
              for sde in (VP, sched)]
  # Both samplers, each called as users call it, in one jitted program: one XLA compile instead
  # of two (compiling, not running, is the cost here).
  out = jax.jit(lambda: [sampler(key, score_fn, x_T) for sampler, score_fn in samplers])()
  (x_vp, nfe_vp), (x_disc, nfe_disc) = [(np.asarray(x), int(nfe)) for x, nfe in out]
  assert np.all(np.isfinite(x_disc))
  assert nfe_disc == nfe_vp or name == "ode"  # adaptive steps may differ
  assert np.abs(x_disc - x_vp).max() < SAMPLER_TOL.get(name, 1e-4)


@pytest.mark.parametrize("name", ["ddim", "dpm_solver", "heun", "ipndm"])
def test_dpm_solver_interpolation_matches_the_vpsde(name):
  """'linear' (DPM-Solver's schedule) with samplers that use alpha, sigma and log-SNR only."""
  sched = Schedule.from_sde(VP, N, interpolation="linear")
  key, x_T = jax.random.PRNGKey(0), jax.random.normal(jax.random.PRNGKey(1), (64, 2))
  vp, disc = (sampling.get_sampler(name, sde, (64, 2), num_steps=20) for sde in (VP, sched))
  # One jitted program for both (one compile instead of two).
  x_vp, x = jax.jit(lambda: (vp(key, GM.score_fn(VP), x_T)[0],
                             disc(key, GM.score_fn(sched), x_T)[0]))()
  assert np.abs(np.asarray(x) - np.asarray(x_vp)).max() < 1e-4


def test_adaptive_ode_converges():
  """The adaptive probability-flow ODE on the default interpolation approaches the VPSDE's flow
  (2e-8 apart exactly) as rtol shrinks, in float64: 1e-5 apart at rtol 1e-7 with ~250 evaluations.
  On a piecewise-constant beta ('linear') dopri5 stays 9e-4 away with 2,000."""
  with jax.enable_x64(True):
    gm = gm64()
    sched = Schedule.from_sde(VP, N)
    key, x_T = jax.random.PRNGKey(0), jax.random.normal(jax.random.PRNGKey(1), (64, 2),
                                                        jnp.float64)
    out = []
    for sde in (VP, sched):
      sampler = sampling.get_sampler("ode", sde, (64, 2), num_steps=1, rtol=1e-7, atol=1e-7)
      x, nfe = sampler(key, gm.score_fn(sde), x_T)
      out.append((np.asarray(x), int(nfe)))
  assert out[1][1] < 400
  assert np.abs(out[0][0] - out[1][0]).max() < 5e-5


def test_likelihood_of_the_oracle():
  """log p_eps(x) through the probability-flow ODE (exact divergence, exact p_T) is the mixture's
  own log-density under the schedule to 1e-4 nats, in float64 at rtol 1e-7 (~200 evaluations; on
  'linear' the same solve takes 3,000 and is 5e-3 off)."""
  sched = Schedule.linear()
  eps = 1.0 / N
  with jax.enable_x64(True):
    gm = gm64()
    x = gm.sample(jax.random.PRNGKey(0), 32, sched, eps)
    ll_fn = likelihood.get_likelihood_fn(sched, divergence="exact", eps=eps, rtol=1e-7, atol=1e-7,
                                         prior_logp=lambda z: gm.log_prob(z, sched, 1.0))
    logp, _, nfe = ll_fn(jax.random.PRNGKey(1), gm.score_fn(sched), x)
    assert int(nfe) < 400
    np.testing.assert_allclose(f64(logp), f64(gm.log_prob(x, sched, eps)), atol=1e-4)


def test_samples_of_a_ddpm_model_have_the_oracle_moments():
  """An eps network (the oracle) on DDPM's linear schedule through score_fn_from_model, sampled by
  DPM-Solver++ with 20 steps: the samples' mean and variance match p_{1/N} of the schedule within
  4 standard errors."""
  sched = Schedule.linear()
  n = 4096
  score_fn = score.score_fn_from_model(sched, oracle_network(sched, GM, "eps"), "epsilon")
  x, nfe = sampling.get_sampler("dpm_solver", sched, (n, 2), num_steps=20)(
      jax.random.PRNGKey(3), score_fn)
  assert int(nfe) == 20
  mean, var = (f64(m) for m in GM.moments(sched, 1.0 / N))
  x = f64(x)
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), 4 * np.sqrt(var / n))
  np.testing.assert_array_less(np.abs(x.var(0) - var), 4 * var * np.sqrt(2.0 / n) * 1.5)


# --- bad inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("build,match", [
    (lambda: Schedule.from_alphas_cumprod([0.9, 0.95, 0.5]), r"strictly decreasing.*\[1\]=0\.95"),
    (lambda: Schedule.from_alphas_cumprod([0.9, 0.9, 0.5]), r"strictly decreasing.*\[1\]=0\.9"),
    (lambda: Schedule.from_alphas_cumprod([1.0, 0.9]), r"\(0, 1\).*\[0\]=1\.0"),
    (lambda: Schedule.from_alphas_cumprod([1.5, 0.9]), r"\(0, 1\).*\[0\]=1\.5"),
    (lambda: Schedule.from_alphas_cumprod([0.9, 0.5, 0.0]), r"\[2\]=0\.0.*2\*\*-24"),
    (lambda: Schedule.from_alphas_cumprod([0.9, -0.1]), r"\[1\]=-0\.1"),
    (lambda: Schedule.from_alphas_cumprod([0.9, float("nan")]), r"finite.*\[1\]=nan"),
    (lambda: Schedule.from_alphas_cumprod([[0.9, 0.5]]), r"1-D.*\(1, 2\)"),
    (lambda: Schedule.from_betas([0.1, 0.0, 0.2]), r"betas.*\[1\]=0\.0"),
    (lambda: Schedule.from_betas([0.1, 1.0]), r"betas.*\[1\]=1\.0"),
    (lambda: Schedule.linear(0), r"num_train_timesteps.*0"),
    (lambda: Schedule.linear(beta_start=-1e-4), r"beta_start.*-0\.0001"),
    (lambda: Schedule.cosine(max_beta=1.0), r"max_beta.*1\.0"),
    (lambda: Schedule.linear(interpolation="spline"), r"interpolation 'spline'.*cubic"),
    (lambda: Schedule.from_diffusers_config({"beta_schedule": "sigmoid"}), r"'sigmoid'"),
    (lambda: Schedule.from_diffusers_config({"rescale_betas_zero_snr": True}), r"zero_snr"),
    (lambda: Schedule.from_sde(sde_lib.VESDE()), r"VESDE is not variance preserving"),
    (lambda: score.score_fn_from_model(Schedule.linear(), lambda x, t: x, "noise"),
     r"prediction type 'noise'.*'epsilon'"),
    (lambda: score.score_fn_from_model(Schedule.linear(), "not a function"), r"apply_fn.*str"),
])
def test_bad_inputs_name_the_bad_value(build, match):
  with pytest.raises(InputError, match=match):
    build()
