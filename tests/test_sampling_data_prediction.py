"""Thresholding of the data prediction and the final denoising jump (sampling/data_prediction.py):
off means bit-identical samplers; 'clip'/'dynamic' keep samples in range where the exact oracle
overshoots; threshold() against numpy; the jump against Tweedie's formula; option checking."""
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracle_flow import CountingScore
from sgm_jax import sampling, sde_lib, toy
from sgm_jax.sampling import data_prediction

SDE = sde_lib.VPSDE()
SHAPE = (6, 2)
# In range: the oracle of the other sampler tests. Out of range: data at +-3 while data_range is
# (-1, 1), so the exact data prediction overshoots by 3x near t = 0.
GM = toy.GaussianMixture.create(jnp.array([[-0.5, 0.0], [0.5, 0.3], [0.0, -0.5]]),
                                jnp.array([0.3, 0.2, 0.25]), jnp.array([0.5, 0.3, 0.2]))
FAR = toy.GaussianMixture.create(jnp.array([[3.0, 3.0], [-3.0, -3.0]]), jnp.array([0.1, 0.1]))
SCORE, FAR_SCORE = GM.score_fn(SDE), FAR.score_fn(SDE)  # one object each: one compilation
X_T = SDE.prior_sampling(jax.random.PRNGKey(3), SHAPE)
KEY = jax.random.PRNGKey(0)


pytestmark = pytest.mark.usefixtures("fast_compiles")


def _build_directly(name, num_steps, **options):
  """The sampler as its builder makes it, bypassing get_sampler's generic options."""
  module_name, builder = sampling.SAMPLERS[name]
  module = importlib.import_module(f"sgm_jax.sampling.{module_name}")
  return getattr(module, builder)(SDE, SHAPE, num_steps, **options)


# --- (a) thresholding off: the samplers are unchanged, bit for bit --------------------------------
@pytest.mark.parametrize("name", sorted(sampling.SAMPLERS))
def test_thresholding_off_is_bit_identical(name):
  reference = _build_directly(name, 4)
  x_ref, nfe_ref = reference(KEY, SCORE, X_T)
  for off in (None, "none"):
    sampler = sampling.get_sampler(name, SDE, SHAPE, num_steps=4, thresholding=off)
    assert sampler.info["thresholding"] is None
    x, nfe = sampler(KEY, SCORE, X_T)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(x_ref))
    assert int(nfe) == int(nfe_ref)


# --- (b) thresholding on: samples stay in the data range -----------------------------------------
IN_RANGE_SAMPLERS = [("ddim", {}), ("deis", {}), ("dpm_solver", {}), ("heun", {}),
                     ("ode", {})]


@pytest.mark.parametrize("name,options", IN_RANGE_SAMPLERS, ids=[n for n, _ in IN_RANGE_SAMPLERS])
def test_thresholding_keeps_samples_in_range(name, options):
  plain = sampling.get_sampler(name, SDE, SHAPE, num_steps=8, **options)
  clipped = sampling.get_sampler(name, SDE, SHAPE, num_steps=8, thresholding="clip",
                                 denoise=True, **options)
  dynamic = sampling.get_sampler(name, SDE, SHAPE, num_steps=8, thresholding="dynamic", **options)
  # The three samplers, each called as users call it, in one jitted program: one XLA compile
  # instead of three (compiling, not running, is the cost here).
  x_plain, x_clipped, x_dynamic = jax.jit(
      lambda: [s(KEY, FAR_SCORE, X_T)[0] for s in (plain, clipped, dynamic)])()
  x = x_plain
  assert float(jnp.min(jnp.abs(x))) > 2.5  # the oracle itself lands near +-3
  # Clip with the final jump: the data prediction itself, exactly in range, at the range's edge
  # (every x0 overshoots).
  assert clipped.info["thresholding"] == "clip" and clipped.info["data_range"] == (-1.0, 1.0)
  x = x_clipped
  assert float(jnp.max(jnp.abs(x))) <= 1.0
  assert np.mean(np.abs(np.asarray(x)) > 1.0 - 1e-3) >= 0.5  # most on the edge (some samples
  # end between the two modes, whose posterior mean is inside the range)
  # Dynamic without the jump: x_eps is in range up to the noise left at eps (sigma(eps) = 0.01)
  # and the error of 8 steps on a thresholded (non-smooth) vector field, against 3 without.
  assert float(jnp.max(jnp.abs(x_dynamic))) <= 1.1


def test_thresholding_with_final_jump_to_an_asymmetric_range():
  for method in ("clip", "dynamic"):
    sampler = sampling.get_sampler("dpm_solver", SDE, SHAPE, num_steps=8, thresholding=method,
                                   threshold_percentile=0.9 if method == "dynamic" else None,
                                   data_range=[0, 1], denoise=True)
    assert sampler.info["data_range"] == (0.0, 1.0)
    x, _ = sampler(KEY, FAR_SCORE, X_T)
    assert 0.0 <= float(jnp.min(x)) and float(jnp.max(x)) <= 1.0
    assert float(jnp.min(x)) < 0.1 and float(jnp.max(x)) > 0.9  # data at -3 and +3: both edges


def test_thresholded_score_is_the_score_of_the_thresholded_data_prediction():
  t = jnp.full((SHAPE[0],), 0.05)
  x = FAR.sample(jax.random.PRNGKey(1), SHAPE[0], SDE, t)
  alpha, sigma = (np.asarray(f(t))[:, None] for f in (SDE.alpha, SDE.sigma))
  score = np.asarray(FAR_SCORE(x, t))
  x0 = (np.asarray(x) + sigma ** 2 * score) / alpha
  assert np.abs(x0).max() > 2.0
  for method in ("clip", "dynamic"):
    thresholded = data_prediction.thresholded_score_fn(SDE, FAR_SCORE, method)
    want = (alpha * np.asarray(data_prediction.threshold(jnp.asarray(x0), method)) - x) / sigma ** 2
    np.testing.assert_allclose(np.asarray(thresholded(x, t)), want, rtol=1e-4, atol=1e-3)
  # Where x0 is in range the score comes back exactly (a correction, not a round trip via x0).
  x = GM.sample(jax.random.PRNGKey(1), SHAPE[0], SDE, t)
  assert float(jnp.max(jnp.abs(GM.denoise(x, SDE, t)))) < 1.0
  np.testing.assert_array_equal(
      np.asarray(data_prediction.thresholded_score_fn(SDE, SCORE, "clip")(x, t)),
      np.asarray(SCORE(x, t)))


# --- (c) threshold() ------------------------------------------------------------------------------
def test_threshold_off_and_clip():
  x0 = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  for off in (None, "none"):
    assert data_prediction.threshold(x0, off) is x0
  clipped = data_prediction.threshold(x0, "clip", data_range=(0, 1))
  np.testing.assert_array_equal(np.asarray(clipped), np.clip(np.asarray(x0), 0, 1))


def test_dynamic_threshold_is_the_identity_in_range():
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 4, 3), minval=-1.0, maxval=1.0)
  x0 = x0.at[0, 0, 0, 0].set(1.0).at[1, 0, 0, 0].set(-1.0)
  np.testing.assert_array_equal(np.asarray(data_prediction.threshold(x0, "dynamic")),
                                np.asarray(x0))


@pytest.mark.parametrize("percentile", [0.995, 0.9, 1.0])
@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_dynamic_threshold_against_numpy(percentile, data_range):
  """Sample 0 is in range (unchanged); sample 1 is scaled to 5x: Imagen's s = percentile of |x0|
  per sample, x0 -> clip(x0, -s, s) / s, in the centered range (x0 - c) / w."""
  lo, hi = data_range
  c, w = (lo + hi) / 2, (hi - lo) / 2
  u = np.array(jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-1, maxval=1))
  u[1] *= 5.0
  x0 = c + w * u
  s = np.maximum(np.percentile(np.abs(u).reshape(2, -1), 100 * percentile, axis=1), 1.0)
  assert s[0] == 1.0 and s[1] > 4.0
  s = s[:, None, None, None]
  want = c + w * np.clip(u, -s, s) / s
  got = data_prediction.threshold(jnp.asarray(x0, jnp.float32), "dynamic", percentile, data_range)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert lo <= float(jnp.min(got)) and float(jnp.max(got)) <= hi


# --- (d) the final denoising jump ----------------------------------------------------------------
JUMP_SAMPLERS = [("deis", {}), ("deis", dict(method="rhork")), ("ipndm", {}), ("dpm_solver", {}),
                 ("heun", {})]


@pytest.mark.parametrize("name,options", JUMP_SAMPLERS,
                         ids=["deis", "deis-rhork", "ipndm", "dpm_solver", "heun"])
def test_final_denoise_is_one_tweedie_step(name, options):
  score = CountingScore(SCORE)
  plain = sampling.get_sampler(name, SDE, SHAPE, num_steps=5, **options)
  denoised = sampling.get_sampler(name, SDE, SHAPE, num_steps=5, denoise=True, **options)
  assert plain.info["denoise"] is False and denoised.info["denoise"] is True
  x, nfe = score.run(plain, KEY, X_T)
  assert int(nfe) == score.count == plain.info["nfe"]
  x0, nfe0 = score.run(denoised, KEY, X_T)
  assert int(nfe0) == score.count == denoised.info["nfe"] == plain.info["nfe"] + 1
  t_end = float(denoised.info["ts"][-1])
  assert t_end == pytest.approx(SDE.default_sampling_eps, rel=1e-12)
  want = GM.denoise(x, SDE, jnp.full((SHAPE[0],), t_end))
  np.testing.assert_allclose(np.asarray(x0), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_final_denoise_uses_the_thresholded_score():
  """With thresholding the jump returns the thresholded data prediction of x_eps."""
  plain = sampling.get_sampler("heun", SDE, SHAPE, num_steps=5, thresholding="dynamic",
                               threshold_percentile=0.5)
  denoised = sampling.get_sampler("heun", SDE, SHAPE, num_steps=5, thresholding="dynamic",
                                  threshold_percentile=0.5, denoise=True)
  x, _ = plain(KEY, FAR_SCORE, X_T)
  x0, nfe = denoised(KEY, FAR_SCORE, X_T)
  assert int(nfe) == denoised.info["nfe"] == 2 * 5 - 1 + 1
  want = data_prediction.threshold(FAR.denoise(x, SDE, jnp.full((SHAPE[0],), 1e-3)), "dynamic",
                                   0.5)
  np.testing.assert_allclose(np.asarray(x0), np.asarray(want), rtol=1e-5, atol=1e-5)


# --- (e) option checking --------------------------------------------------------------------------
@pytest.mark.parametrize("options,match", [
    (dict(thresholding="static"), r"thresholding 'static'.*'clip', 'dynamic'"),
    (dict(thresholding=True), r"thresholding True.*'clip', 'dynamic'"),
    (dict(thresholding="dynamic", threshold_percentile=0.0), r"\(0, 1\], got 0.0"),
    (dict(thresholding="dynamic", threshold_percentile=1.5), r"\(0, 1\], got 1.5"),
    (dict(thresholding="dynamic", threshold_percentile=True), r"\(0, 1\], got True"),
    (dict(thresholding="dynamic", threshold_percentile="0.9"), r"\(0, 1\], got '0.9'"),
    (dict(thresholding="clip", threshold_percentile=0.9), r"threshold_percentile=0.9.*'dynamic'"),
    (dict(data_range=(0, 1)), r"data_range=\(0, 1\).*'clip' or 'dynamic'"),
    (dict(thresholding="clip", data_range=(1, -1)), r"lo < hi, got \(1, -1\)"),
    (dict(thresholding="clip", data_range=(0,)), r"pair.*got \(0,\)"),
    (dict(thresholding="clip", data_range="0,1"), r"pair.*got '0,1'"),
    (dict(thresholding="clip", data_range=(0, float("inf"))), r"finite.*got \(0, inf\)"),
    (dict(denoise="False"), r"denoise must be true or false, got 'False'"),
    (dict(dnoise=True), r"unknown option.*'dnoise'.*for every sampler.*'thresholding'"),
])
@pytest.mark.parametrize("name", ["deis", "ddim"])
def test_bad_options_raise(name, options, match):
  with pytest.raises(ValueError, match=match):
    sampling.get_sampler(name, SDE, SHAPE, num_steps=4, **options)


# --- (f) score scaling ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["deis", "pc", "dpm_solver"])
def test_score_scale_one_is_bit_identical_and_other_scales_equal_a_scaled_score(name):
  reference = _build_directly(name, 4)
  x_ref, _ = reference(KEY, SCORE, X_T)
  for off in (None, 1, 1.0):
    sampler = sampling.get_sampler(name, SDE, SHAPE, num_steps=4, score_scale=off)
    assert sampler.info["score_scale"] is None
    np.testing.assert_array_equal(np.asarray(sampler(KEY, SCORE, X_T)[0]), np.asarray(x_ref))
  scaled = sampling.get_sampler(name, SDE, SHAPE, num_steps=4, score_scale=1.25)
  assert scaled.info["score_scale"] == 1.25
  # Both in one jitted program (one compile instead of two): compared to rounding, not bits.
  x, x_direct = jax.jit(lambda: (
      scaled(KEY, SCORE, X_T)[0],
      reference(KEY, jax.tree_util.Partial(lambda x, t: 1.25 * SCORE(x, t)), X_T)[0]))()
  np.testing.assert_allclose(np.asarray(x), np.asarray(x_direct), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(x) - np.asarray(x_ref)).max() > 1e-2  # the scale changes the samples


def test_score_scale_on_a_gaussian_gives_the_closed_form_of_the_scaled_flow():
  """Data N(0, s0^2): s = -x / v(t), v = alpha^2 s0^2 + sigma^2, and the flow with c s is
  d ln x / dt = -beta (1 - c / v) / 2, so x(t_end) = x(T) exp(int_t_end^T beta (1 - c / v) dt / 2)
  for each coordinate; c > 1 contracts the samples toward the mode more than the exact flow."""
  s0, c = 0.5, 1.1
  gaussian = toy.GaussianMixture.create(jnp.zeros((1, 2)), jnp.array([s0]))
  ratios = {}
  for scale in (1.0, c):
    sampler = sampling.get_sampler("ode", SDE, SHAPE, score_scale=scale, rtol=1e-7, atol=1e-7)
    x, _ = sampler(KEY, gaussian.score_fn(SDE), X_T)
    ratios[scale] = np.asarray(x) / np.asarray(X_T)
  t = np.linspace(sampler.info["t_end"], SDE.T, 200_001)
  beta = SDE.beta_min + t * (SDE.beta_max - SDE.beta_min)
  v = np.asarray(SDE.alpha(jnp.asarray(t))) ** 2 * s0 ** 2 + np.asarray(
      SDE.sigma(jnp.asarray(t))) ** 2
  for scale, ratio in ratios.items():
    want = np.exp(np.trapezoid(beta * (1 - scale / v), t) / 2)
    np.testing.assert_allclose(ratio, want, rtol=2e-4)
  assert ratios[c].max() < ratios[1.0].min()


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1.1"])
def test_bad_score_scale_raises(bad):
  with pytest.raises(ValueError, match=r"score_scale must be a finite number > 0.*got " +
                     re.escape(repr(bad))):
    sampling.get_sampler("deis", SDE, SHAPE, num_steps=4, score_scale=bad)


@pytest.mark.parametrize("name", ["pc", "deis"])
def test_the_final_jump_uses_the_scaled_score(name):
  """With score_scale c and the final jump, the jump is Tweedie's formula on c * score:
  x0 = (x + sigma^2 c s(x, eps)) / alpha at the end of the scaled loop (pc: the small configs'
  path). The loop ends at eps = 0.1, where the jump moves x by sigma^2 s, not by ~1e-6."""
  c, options = 1.5, dict(score_scale=1.5, eps=0.1)
  plain = sampling.get_sampler(name, SDE, SHAPE, num_steps=4, **options)
  denoised = sampling.get_sampler(name, SDE, SHAPE, num_steps=4, denoise=True, **options)
  x, _ = plain(KEY, SCORE, X_T)
  x0, nfe = denoised(KEY, SCORE, X_T)
  assert int(nfe) == plain.info["nfe"] + 1
  t_end = jnp.full((SHAPE[0],), float(denoised.info["ts"][-1]))
  alpha, sigma = (np.asarray(f(t_end))[:, None] for f in (SDE.alpha, SDE.sigma))
  want = (np.asarray(x) + sigma ** 2 * c * np.asarray(SCORE(x, t_end))) / alpha
  np.testing.assert_allclose(np.asarray(x0), want, rtol=1e-5, atol=1e-5)
  unscaled = (np.asarray(x) + sigma ** 2 * np.asarray(SCORE(x, t_end))) / alpha
  assert np.abs(unscaled - want).max() > 1e-2  # the scale is visible in the jump
