"""Controllable generation against exact Gaussian-mixture oracles (sgm_jax/controllable/).

For an isotropic mixture sum_k w_k N(mu_k, s_k^2 I), conditioning on known coordinates c gives a
mixture over the unknown ones with weights pi_k ~ w_k N(c; mu_k[known], s_k^2 I) and the same
component means and stds: the exact target of inpainting. Mixtures are small (<= 6 dims) so each
test runs in seconds.
"""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgm_jax import controllable as ctl
from sgm_jax import sde_lib, toy
from sgm_jax.sampling import get_sampler

# Compile-heavy, tiny compute: most programs here compile for longer than they run.
pytestmark = pytest.mark.usefixtures("fast_compiles")

VP = sde_lib.VPSDE()


# --- exact conditionals of an isotropic mixture --------------------------------------------------
def exact_conditional(means, stds, weights, known, c):
  """(pi, mean, var) of p(x_unknown | x_known = c): weights and per-coordinate moments."""
  means, stds, weights = map(np.asarray, (means, stds, weights))
  known = np.asarray(known)
  mk, mu = means[:, known], means[:, ~known]
  log_pi = (np.log(weights) - known.sum() * np.log(stds)
            - 0.5 * ((np.asarray(c)[None] - mk) ** 2).sum(-1) / stds ** 2)
  pi = np.exp(log_pi - log_pi.max())
  pi /= pi.sum()
  mean = pi @ mu
  var = pi @ (stds[:, None] ** 2 + mu ** 2) - mean ** 2
  return pi, mean, var


# Regime where the replacement approximation is accurate: the components differ strongly in the
# known coordinates (0-2) and only slightly, relative to their stds, in the unknown ones (3-4), so
# the unknown coordinates choose a component at noise levels where y_t carries the same evidence as
# y. (With well separated unknown modes the paper's replacement is biased towards the prior weights;
# see the module docstring of sgm_jax/controllable/inpainting.py.)
MEANS = np.array([[0.8, 0.8, 0.4, 0.2, 0.2],
                  [-0.8, -0.8, -0.4, -0.2, -0.2],
                  [0.8, -0.8, 0.0, 0.2, -0.2]])
STDS = np.array([0.5, 0.5, 0.45])
WEIGHTS = np.array([0.4, 0.4, 0.2])
KNOWN = np.array([True, True, True, False, False])
C = np.array([0.2, 0.1, 0.0])
N = 2000


def _check_inpainted(mix, x, images):
  x = np.asarray(x)
  pi, mean, var = exact_conditional(MEANS, STDS, WEIGHTS, KNOWN, C)
  assert np.all(np.isfinite(x))
  np.testing.assert_array_equal(x[:, KNOWN], np.asarray(images)[:, KNOWN])
  # E[p(k | x)] = p(k | c) for x ~ p(x | x_known = c) (tower property).
  weights = np.asarray(mix.responsibilities(jnp.asarray(x))).mean(0)
  u = x[:, ~KNOWN]
  z_mean = (u.mean(0) - mean) / np.sqrt(var / len(u))
  centred = (u - u.mean(0)) ** 2
  se_var = np.sqrt(np.mean((centred - centred.mean(0)) ** 2, axis=0) / len(u))
  return pi, weights, z_mean, (u.var(0) - var) / var, se_var / var


def test_pc_inpainting_matches_exact_conditional():
  mix = toy.GaussianMixture.create(MEANS, STDS, WEIGHTS)
  images = jnp.zeros((N, 5), jnp.float32).at[:, np.where(KNOWN)[0]].set(jnp.asarray(C, jnp.float32))
  inpaint = ctl.get_inpainter("pc", VP, (N, 5), 400)  # reverse diffusion + Langevin, snr 0.16
  # Key 1: the mean z-scores below are those of a biased estimate (mean -1.8, sd 0.9 over keys),
  # and key 0 draws -4.47 in the last coordinate, a 2.6-sd tail of that bias.
  x, nfe = inpaint(jax.random.PRNGKey(1), mix.score_fn(VP), images, jnp.asarray(KNOWN))
  assert int(nfe) == 800
  pi, weights, z_mean, rel_var, rel_se = _check_inpainted(mix, x, images)
  assert np.sort(pi)[-2] > 0.15  # a genuinely multi-modal conditional (0.70, 0.10, 0.20)
  # Measured over 24 keys: weight errors <= 0.019, mean z-scores -4.5..+0.6 (mean -1.7 and -1.9:
  # a small replacement bias), relative variance errors -0.04..+0.12 with standard errors ~0.03.
  np.testing.assert_allclose(weights, pi, atol=0.03)
  assert np.all(np.abs(z_mean) < 4.0), z_mean
  assert np.all(np.abs(rel_var) < 0.04 + 4.0 * rel_se), (rel_var, rel_se)
  # Without the known pixels the unknown coordinates follow the prior: the test can tell.
  _, mean_prior, var_prior = exact_conditional(MEANS, STDS, WEIGHTS, np.zeros(5, bool), [])
  gap = np.abs(mean_prior[~KNOWN] - (pi @ MEANS[:, ~KNOWN]))
  assert np.all(gap / np.sqrt(var_prior[~KNOWN] / N) > 8.0)


def _inpaint_two_conditions(method, steps, options, key=1):
  """Inpainting of 40000 samples under each of the conditions C and -C, in one batch, with the
  known pixels and component weights checked: (inpainter, mixture, x, images, ratio), where ratio
  is how far the known pixels steer the unknown ones: 1 for exact sampling, ~0 if ignored."""
  mix = toy.GaussianMixture.create(MEANS, STDS, WEIGHTS)
  n, half = 80000, 40000
  cs = np.concatenate([np.tile(C, (half, 1)), np.tile(-C, (half, 1))])  # two conditions, one batch
  images = jnp.zeros((n, 5), jnp.float32).at[:, np.where(KNOWN)[0]].set(
      jnp.asarray(cs, jnp.float32))
  inpaint = ctl.get_inpainter(method, VP, (n, 5), steps, **options)
  x, nfe = inpaint(jax.random.PRNGKey(key), mix.score_fn(VP), images, jnp.asarray(KNOWN))
  assert int(nfe) == inpaint.info["nfe"]
  x = np.asarray(x)
  assert np.all(np.isfinite(x))
  np.testing.assert_array_equal(x[:, KNOWN], np.asarray(images)[:, KNOWN])
  exact = [exact_conditional(MEANS, STDS, WEIGHTS, KNOWN, c) for c in (C, -C)]
  halves = (slice(0, half), slice(half, n))
  for (pi, _, _), rows in zip(exact, halves):
    weights = np.asarray(mix.responsibilities(jnp.asarray(x[rows]))).mean(0)
    np.testing.assert_allclose(weights, pi, atol=0.07)
  shift = x[halves[0]][:, ~KNOWN].mean(0) - x[halves[1]][:, ~KNOWN].mean(0)
  ratio = np.mean(shift / (exact[0][1] - exact[1][1]))
  return inpaint, mix, x, images, ratio


@pytest.mark.parametrize("method,steps,options", [
    ("deis", 20, {}),
    ("ddim", 50, {}),
    ("ode", 50, {"solver": "heun"}),
    ("heun", 25, {}),
    ("dpm_solver", 20, {}),
    ("ipndm", 20, {}),
])
def test_deterministic_inpainting(method, steps, options):
  """Known pixels exact; unknown ones only approximately right. Replacement inside a deterministic
  sampler is a heuristic: nothing re-equilibrates the unknown coordinates (PC's Langevin corrector
  does), and here the unknown means move only ~24% of the way from the prior to the exact
  conditional. The test checks the component weights loosely (measured error ~0.04) and how far
  the known pixels steer the unknown ones (40000 samples a condition, so that fraction is measured
  to +-0.011)."""
  inpaint, mix, x, images, ratio = _inpaint_two_conditions(method, steps, options)
  # The replacement heuristic's bias: ratio 0.243 (deis, ddim) and 0.231 (ode) averaged over 8
  # keys, seed-to-seed sd 0.011; without replacement -0.007 +- 0.016. Bounds: ~5 sd either side.
  # With this key (keys 0-2): deis, ddim, ipndm 0.257 (0.22-0.26), ode 0.258, dpm_solver 0.262,
  # heun 0.226 (0.19-0.23; its grid, polynomial in rho, spends fewer steps at high noise).
  assert 0.18 < ratio < 0.30, ratio
  # Deterministic given the key.
  x2, _ = inpaint(jax.random.PRNGKey(1), mix.score_fn(VP), images, jnp.asarray(KNOWN))
  np.testing.assert_array_equal(x, np.asarray(x2))


@pytest.mark.usefixtures("optimized_compiles")  # 100 steps over 80000 samples run long
def test_sde_inpainting_without_corrector():
  """An SDE sampler without PC's corrector (milstein, i.e. Euler-Maruyama here) sits between the
  deterministic samplers and PC: the known pixels steer the unknown ones ~38% of the way."""
  ratio = _inpaint_two_conditions("milstein", 100, {})[-1]
  # Measured: 0.381-0.387 over keys 0-2 at 100 steps (0.37-0.41 at 400); PC without corrector 0.36.
  assert 0.32 < ratio < 0.45, ratio


def test_inpainting_images_and_broadcast_mask():
  images = jax.random.uniform(jax.random.PRNGKey(0), (6, 4, 4, 1), minval=-1.0, maxval=1.0)
  mix = toy.GaussianMixture.from_images(images, std=0.1)
  mask = np.zeros((4, 4, 1), np.float32)
  mask[:, :2] = 1.0  # left half known
  inpaint = ctl.get_inpainter("ddim", VP, (6, 4, 4, 1), 20)
  x, nfe = inpaint(jax.random.PRNGKey(3), mix.score_fn(VP), images, mask)
  assert x.shape == images.shape and int(nfe) == 20
  np.testing.assert_array_equal(np.asarray(x)[:, :, :2], np.asarray(images)[:, :, :2])
  assert not np.allclose(np.asarray(x)[:, :, 2:], 0.0)


def test_inpainter_rejects_bad_arguments():
  with pytest.raises(ValueError, match="inpainting method"):
    ctl.get_inpainter("nope", VP, (2, 3), 10)
  with pytest.raises(ValueError, match="unknown option"):
    ctl.get_inpainter("deis", VP, (2, 3), 10, snr=0.1)
  with pytest.raises(ValueError, match="known_noise"):
    ctl.get_inpainter("pc", VP, (2, 3), 10, known_noise="sometimes")


def test_stochastic_samplers_draw_the_known_regions_noise_afresh_by_default():
  """The SDE samplers' own noise is fresh at every step, so is the known region's; an ODE
  sampler keeps one draw (its path stays deterministic)."""
  for method in ("pc", "milstein", "edm_sde", "dpm_solver_sde", "restart"):
    assert ctl.get_inpainter(method, VP, (2, 3), 10).info["known_noise"] == "fresh", method
  for method in ("deis", "heun", "ddim"):
    assert ctl.get_inpainter(method, VP, (2, 3), 10).info["known_noise"] == "fixed", method
  # DEIS's own `method` option passes through (the inpainting method is positional-only).
  assert ctl.get_inpainter("deis", VP, (2, 3), 5, method="rhoab", order=1).info["order"] == 1
  inpaint = ctl.get_inpainter("ddim", VP, (2, 3), 10)
  with pytest.raises(ValueError, match="shape"):
    inpaint(jax.random.PRNGKey(0), lambda x, t: -x, jnp.zeros((3, 3)), jnp.ones((3,)))


# --- colorization --------------------------------------------------------------------------------
def test_color_basis_is_orthogonal_with_gray_first_row():
  M = ctl.COLOR_BASIS
  np.testing.assert_allclose(M @ M.T, np.eye(3), atol=1e-12)
  np.testing.assert_allclose(M[0], np.ones(3) / np.sqrt(3.0), atol=1e-12)
  rgb = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 3))
  np.testing.assert_allclose(ctl.couple(ctl.decouple(rgb)), rgb, atol=1e-6)
  np.testing.assert_allclose(ctl.decouple(rgb)[..., 0] / np.sqrt(3.0), rgb.mean(-1), atol=1e-6)


@pytest.mark.parametrize("method,steps", [("pc", 100), ("deis", 10)])
def test_colorization_keeps_gray_channel(method, steps):
  colors = jax.random.uniform(jax.random.PRNGKey(0), (8, 4, 4, 3), minval=-1.0, maxval=1.0)
  mix = toy.GaussianMixture.from_images(colors, std=0.1)
  gray = colors[:4].mean(-1, keepdims=True)  # (B, H, W, 1)
  colorize = ctl.get_colorizer(method, VP, (4, 4, 4, 3), steps)
  rgb, nfe = colorize(jax.random.PRNGKey(1), mix.score_fn(VP), gray)
  rgb = np.asarray(rgb)
  assert rgb.shape == (4, 4, 4, 3) and int(nfe) == colorize.info["nfe"]
  assert np.all(np.isfinite(rgb))
  np.testing.assert_allclose(rgb.mean(-1, keepdims=True), np.asarray(gray), atol=2e-6, rtol=0)
  assert np.abs(rgb - rgb.mean(-1, keepdims=True)).max() > 0.1  # it did add colour
  if method == "deis":  # a 3-channel input keeps its own gray value
    rgb3, _ = colorize(jax.random.PRNGKey(1), mix.score_fn(VP), colors[4:])
    np.testing.assert_allclose(np.asarray(rgb3).mean(-1), np.asarray(colors[4:]).mean(-1),
                               atol=2e-6, rtol=0)


# --- class-conditional sampling ------------------------------------------------------------------
CLASS_MEANS = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-2.0, 0.0, 0.5], [0.0, -2.0, -0.5]])
CLASS_LABELS = np.array([0, 1, 2, 1])


@pytest.fixture(scope="module")
def labelled_mixture():
  return toy.GaussianMixture.create(CLASS_MEANS, 0.5, [0.4, 0.3, 0.2, 0.1], labels=CLASS_LABELS)


def test_conditional_score_is_the_class_mixture_score(labelled_mixture):
  """Eq. 14 with the exact classifier: score + grad log p_t(y | x) = score of p_t(x | y)."""
  mix = labelled_mixture
  y = 1
  sub = toy.GaussianMixture.create(CLASS_MEANS[CLASS_LABELS == y], 0.5, [0.3, 0.1])
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (16, 3))
  t = jax.random.uniform(jax.random.PRNGKey(1), (16,), minval=0.01, maxval=1.0)
  score_fn, log_prob_fn = mix.score_fn(VP), ctl.mixture_log_prob_fn(mix, VP)
  # One compiled function serves every label and scale: they are traced leaves of the Partial.
  evaluate = jax.jit(lambda cond, x, t: cond(x, t))
  cond = lambda y, scale=1.0: evaluate(ctl.conditional_score_fn(score_fn, log_prob_fn, y, scale),
                                       x, t)
  # the exact scores in one program (op by op, they took longer than the rest of the test)
  sub_score, mix_score = jax.jit(lambda x, t: (sub.score(x, VP, t), mix.score(x, VP, t)))(x, t)
  np.testing.assert_allclose(cond(y), sub_score, rtol=1e-4, atol=1e-4)
  # scale = 0 is the unconditional score; the label may be per example.
  np.testing.assert_allclose(cond(y, 0.0), mix_score, rtol=1e-5, atol=1e-6)
  per, one = cond(jnp.asarray(np.arange(16) % 3)), cond(jnp.full((16,), 2))
  np.testing.assert_allclose(per[2::3], one[2::3], rtol=1e-6)


@pytest.mark.parametrize("name,steps,options", [
    ("pc", 200, {}),
    ("deis", 20, {}),
    ("ode", 1, {}),
])
def test_class_conditional_sampling(labelled_mixture, name, steps, options):
  mix = labelled_mixture
  score_fn, log_prob_fn = mix.score_fn(VP), ctl.mixture_log_prob_fn(mix, VP)
  sampler = get_sampler(name, VP, (1000, 3), steps, **options)
  for y in (2, 1):  # the same compiled sampler serves every label
    x, _ = sampler(jax.random.PRNGKey(y), ctl.conditional_score_fn(score_fn, log_prob_fn, y))
    probs = np.asarray(ctl.mixture_class_probs(mix, x))
    assert (probs.argmax(-1) == y).mean() >= 0.95
  # Within class 1 the components keep their relative weights 0.3 : 0.1.
  r = np.asarray(mix.responsibilities(x)).mean(0)
  assert abs(r[1] / (r[1] + r[3]) - 0.75) < 0.05


class _PixelLogits(nn.Module):
  """Logits linear in the pixels and the noise level."""

  @nn.compact
  def __call__(self, x, noise):
    return nn.Dense(3)(jnp.concatenate([x.reshape(x.shape[0], -1), noise[:, None]], axis=-1))


def test_noise_conditional_wrn_mapping():
  """The WRN sees x / alpha(t) at the VE-equivalent noise level rho(t) = sigma(t) / alpha(t)."""
  from sgm_jax.models.wideresnet import create_classifier
  model = create_classifier(num_classes=3, blocks_per_group=1, channel_multiplier=1)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t = jnp.array([0.3, 0.7])
  ve = sde_lib.VESDE()

  # Parameters drawn with numpy at the shapes of the WRN's own (a trace, no compilation): the
  # checks below hold at any parameters, and the initializers compiled into the program cost
  # more than the rest of it.
  rng = np.random.default_rng(1)
  drawn = lambda network: jax.tree_util.tree_map(
      lambda leaf: (rng.normal(0, 1, leaf.shape)
                    / np.sqrt(np.prod(leaf.shape[:-1]) if len(leaf.shape) >= 2 else 10.0)
                    ).astype(leaf.dtype),
      jax.eval_shape(lambda: network.init(jax.random.PRNGKey(1), x, jnp.ones((2,))))["params"])
  params = drawn(model)
  # The WRN's normalization layers nearly hide its input's scale: logits linear in the pixels
  # show x / alpha(t) too.
  linear = _PixelLogits()
  linear_params = drawn(linear)

  @jax.jit
  def compute(params, x, t):
    apply = lambda xx, noise: model.apply({"params": params}, xx, noise)
    out = {
        "ve": (ctl.NoiseConditionalLogits(model, ve)(params, x, t), apply(x, ve.sigma(t))),
        "vp": (ctl.NoiseConditionalLogits(model, VP)(params, x, t),
               apply(x / VP.alpha(t)[:, None, None, None], VP.rho(t))),
        "vp_linear": (ctl.NoiseConditionalLogits(linear, VP)(linear_params, x, t),
                      linear.apply({"params": linear_params}, x / VP.alpha(t)[:, None, None, None],
                                   VP.rho(t))),
    }
    log_prob_fn = ctl.wrn_log_prob_fn(model, params, VP, input_normalization=None)
    out["log_prob"] = log_prob_fn(x, t, jnp.array([0, 2]))
    out["score"] = ctl.conditional_score_fn(lambda x, t: -x, log_prob_fn, 1, 2.0)(x, t)
    return out

  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)  # compile-heavy, tiny compute
  try:
    out = compute(params, x, t)
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
  for name in ("ve", "vp", "vp_linear"):
    np.testing.assert_allclose(out[name][0], out[name][1], rtol=1e-5, atol=1e-5)
  assert out["log_prob"].shape == (2,) and np.all(np.asarray(out["log_prob"]) <= 0)
  assert out["score"].shape == x.shape and np.all(np.isfinite(np.asarray(out["score"])))
  assert not np.allclose(np.asarray(out["score"]), -np.asarray(x))  # the classifier contributes


# --- classifier training -------------------------------------------------------------------------
class _MLP(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, log_rho):
    h = jnp.concatenate([x, log_rho[:, None]], axis=-1)
    h = nn.swish(nn.Dense(32)(h))
    h = nn.swish(nn.Dense(32)(h))
    return nn.Dense(self.num_classes)(h)


@dataclasses.dataclass(frozen=True)
class _MLPLogits:
  model: nn.Module
  sde: sde_lib.SDE

  def __call__(self, params, x, t):
    return self.model.apply({"params": params}, x / self.sde.alpha(t)[:, None],
                            jnp.log(self.sde.rho(t)))


def test_train_classifier_loss_decreases(labelled_mixture):
  mix = labelled_mixture
  logits_fn = _MLPLogits(_MLP(3), VP)
  params = logits_fn.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)), jnp.zeros((1,)))["params"]

  # The 300 batches of keys 100.. drawn in one program (op by op, one call per batch, they cost
  # 1.5 s more); the same draws as mix.sample(PRNGKey(100 + i), 256) one at a time.
  draw = jax.jit(jax.vmap(lambda seed: mix.sample(jax.random.PRNGKey(seed), 256,
                                                  return_components=True)))
  xs, comps = jax.device_get(draw(jnp.arange(100, 400)))
  labels = np.asarray(mix.labels)[comps]
  batches = ({"image": x, "label": y} for x, y in zip(xs, labels))

  logged = []
  params, opt_state, losses = ctl.train_classifier(
      jax.random.PRNGKey(1), params, batches, 300, sde=VP, logits_fn=logits_fn,
      optimizer=optax.adam(3e-3), log_fn=lambda s, l: logged.append(s), log_every=100)
  assert losses.shape == (300,) and logged == [100, 200, 300]
  assert losses[-50:].mean() < 0.85 * losses[:10].mean(), (losses[:10].mean(), losses[-50:].mean())
  # The trained classifier is nearly Bayes-optimal on clean data (t = eps).
  x, comp = mix.sample(jax.random.PRNGKey(7), 2000, return_components=True)
  t = jnp.full((2000,), 1e-3)
  acc = (np.asarray(logits_fn(params, x, t)).argmax(-1) == np.asarray(mix.labels[comp])).mean()
  bayes = (np.asarray(ctl.mixture_class_probs(mix, x)).argmax(-1)
           == np.asarray(mix.labels[comp])).mean()
  assert acc > 0.9 and bayes > 0.95, (acc, bayes)  # chance level is 0.4


# --- latents ------------------------------------------------------------------------------------
def test_slerp_endpoints_and_norm():
  za, zb = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 1))
  path = ctl.slerp(za, zb, jnp.linspace(0.0, 1.0, 5))
  assert path.shape == (5, 4, 4, 1)
  np.testing.assert_array_equal(np.asarray(path[0]), np.asarray(za))
  np.testing.assert_array_equal(np.asarray(path[-1]), np.asarray(zb))
  # On the great circle: equal-norm endpoints give constant norm.
  zb_scaled = zb * jnp.linalg.norm(za) / jnp.linalg.norm(zb)
  norms = jnp.linalg.norm(ctl.slerp(za, zb_scaled, jnp.linspace(0.0, 1.0, 5)).reshape(5, -1),
                          axis=-1)
  np.testing.assert_allclose(norms, jnp.linalg.norm(za), rtol=1e-5)
  # Parallel latents fall back to linear interpolation.
  np.testing.assert_allclose(ctl.slerp(za, 2.0 * za, jnp.array([0.5]))[0], 1.5 * za, rtol=1e-5)


def test_encode_decode_and_interpolation_strip(tmp_path):
  mix = toy.GaussianMixture.from_digits(std=0.1, num_images=20)
  score_fn = mix.score_fn(VP)
  x = mix.sample(jax.random.PRNGKey(0), 2)
  z, _ = ctl.get_encode_fn(VP)(score_fn, x)
  x_rec, _ = ctl.get_decode_fn(VP)(score_fn, z)
  np.testing.assert_allclose(x_rec, x, atol=1e-3)
  assert float(jnp.std(z)) > 0.5  # the latent is noise-like, not the image
  images, path, nfe = ctl.get_interpolator(VP, 5)(score_fn, x[0], x[1])
  assert images.shape == (5, 8, 8, 1) and int(nfe) > 0
  np.testing.assert_array_equal(np.asarray(path[0]), np.asarray(z[0]))
  np.testing.assert_array_equal(np.asarray(path[-1]), np.asarray(z[1]))
  np.testing.assert_allclose(images[0], x[0], atol=1e-3)
  np.testing.assert_allclose(images[-1], x[1], atol=1e-3)
  out = ctl.save_interpolation_strip(images, os.path.join(tmp_path, "strip.png"), upscale=2)
  from PIL import Image
  with Image.open(out) as png:
    assert png.size == (2 * (5 * 10 + 2), 2 * 12)  # one row of 5 images, 2-pixel padding
