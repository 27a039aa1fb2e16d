"""score.py parameterizations (eps, score, x0, v, edm): exact oracle outputs give the exact score,
the 'output' loss weighting is the MSE of the network's own output, input scaling, bad values."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import losses
from sgm_jax import score as score_lib
from sgm_jax import sde_lib
from sgm_jax.toy import GaussianMixture

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

SHAPE = (4, 3, 3, 1)
T = np.array([1e-3, 0.1, 0.5, 1.0], np.float32)
SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.subVPSDE(), "ve": sde_lib.VESDE()}
SIGMA_DATA = 0.5


def _mixture():
  means = jax.random.normal(jax.random.PRNGKey(3), (3,) + SHAPE[1:]) * 0.6
  return GaussianMixture.create(means, stds=0.2)


def _exact_output(kind: str, sde, gm, x, t):
  """The network output F* that the parameterization `kind` should learn for the mixture."""
  a = sde.alpha(t).reshape(-1, 1, 1, 1)
  s = sde.sigma(t).reshape(-1, 1, 1, 1)
  x0, eps = gm.denoise(x, sde, t), gm.eps(x, sde, t)
  if kind == "score":
    return gm.score(x, sde, t)
  if kind == "eps":
    return eps
  if kind == "x0":
    return x0
  if kind == "v":
    return a * eps - s * x0                       # Salimans & Ho 2022
  rho = s / a                                     # EDM: x0 = c_skip x / alpha + c_out F
  c_skip = SIGMA_DATA ** 2 / (rho ** 2 + SIGMA_DATA ** 2)
  c_out = rho * SIGMA_DATA / jnp.sqrt(rho ** 2 + SIGMA_DATA ** 2)
  return (x0 - c_skip * x / a) / c_out


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("kind", ["score", "eps", "x0", "v", "edm"])
def test_exact_output_gives_the_exact_score(sde_name, kind):
  # float64: an x0 output is ill-conditioned at small sigma (score = (alpha x0 - x) / sigma^2)
  with jax.enable_x64(True):
    sde, gm = SDES[sde_name], _mixture()
    gm = GaussianMixture.create(gm.means.astype(jnp.float64), 0.2)
    t = jnp.asarray(T, jnp.float64)
    x = gm.sample(jax.random.PRNGKey(0), SHAPE[0], sde, t).astype(jnp.float64)
    F = _exact_output(kind, sde, gm, x, t)
    got = score_lib.score_from_output(sde, kind, SIGMA_DATA, F, x, t)
    want = gm.score(x, sde, t)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-7 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("kind", ["score", "eps", "x0", "v", "edm"])
def test_output_loss_weight_turns_eps_mse_into_output_mse(sde_name, kind):
  sde, gm = SDES[sde_name], _mixture()
  t = jnp.asarray(T[1:])  # sigma(t) > 0 comfortably
  x = gm.sample(jax.random.PRNGKey(1), 3, sde, t)
  F_star = _exact_output(kind, sde, gm, x, t)
  F = F_star + 0.1 * jax.random.normal(jax.random.PRNGKey(2), F_star.shape)
  sigma = sde.sigma(t).reshape(-1, 1, 1, 1)
  eps_err = -sigma * (score_lib.score_from_output(sde, kind, SIGMA_DATA, F, x, t)
                      - score_lib.score_from_output(sde, kind, SIGMA_DATA, F_star, x, t))
  per = lambda v: jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1)
  w = score_lib.output_loss_weight(sde, kind, SIGMA_DATA, t)
  np.testing.assert_allclose(w * per(eps_err), per(F - F_star), rtol=2e-3)


def test_v_is_edm_with_unit_data_std_on_the_vp_sde():
  sde = SDES["vp"]
  x = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  F = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  t = jnp.asarray(T)
  np.testing.assert_allclose(score_lib.score_from_output(sde, "v", 0.5, F, x, t),
                             score_lib.score_from_output(sde, "edm", 1.0, -F, x, t), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(score_lib.network_input(sde, "edm", 1.0, x, t), x, rtol=1e-5)


class Identity(nn.Module):
  """Returns what it is given, so the test sees the network's input."""

  @nn.compact
  def __call__(self, x, labels):
    self.param("unused", nn.initializers.zeros, ())
    return x


def test_edm_network_sees_unit_variance_input():
  sde = SDES["vp"]
  x = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  t = jnp.asarray(T)
  variables = Identity().init(jax.random.PRNGKey(0), x, t)
  score_fn = score_lib.get_score_fn(sde, Identity(), variables, True, parameterization="edm",
                                    sigma_data=SIGMA_DATA)
  a, s = sde.alpha(t).reshape(-1, 1, 1, 1), sde.sigma(t).reshape(-1, 1, 1, 1)
  S = jnp.sqrt(s ** 2 + (a * SIGMA_DATA) ** 2)
  want = score_lib.score_from_output(sde, "edm", SIGMA_DATA, x / S, x, t)
  np.testing.assert_allclose(score_fn(x, t), want, rtol=1e-6)
  # default: the SDE's own output (eps for VP), unscaled input
  eps_fn = score_lib.get_score_fn(sde, Identity(), variables, True)
  np.testing.assert_allclose(eps_fn(x, t), -x / s, rtol=1e-6)


@pytest.mark.parametrize("kind", ["x0", "v", "edm"])
def test_dsm_output_weighting_is_the_plain_output_mse(kind):
  """get_loss_fn(weighting='output') at fixed times equals |F(x_t) - F*|^2 computed directly."""
  sde = SDES["vp"]
  model = Identity()
  x0 = jax.random.uniform(jax.random.PRNGKey(0), SHAPE, minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(0), x0, jnp.zeros(SHAPE[0]))["params"]
  t = jnp.asarray([0.05, 0.1, 0.5, 0.7], jnp.float32)
  key = jax.random.PRNGKey(5)
  score_fn = score_lib.get_score_fn(sde, model, {"params": params}, True, parameterization=kind,
                                    sigma_data=SIGMA_DATA)
  weight = lambda tt: score_lib.output_loss_weight(sde, kind, SIGMA_DATA, tt)
  got = losses.dsm_loss(score_fn, sde, x0, key, "output", reduce_mean=True, t=t,
                        output_weight=weight)
  # the same noise as dsm_loss draws
  z = jax.random.normal(jax.random.split(key)[1], x0.shape)
  a, s = sde.alpha(t).reshape(-1, 1, 1, 1), sde.sigma(t).reshape(-1, 1, 1, 1)
  x_t = a * x0 + s * z
  F = score_lib.network_input(sde, kind, SIGMA_DATA, x_t, t)  # Identity's output
  if kind == "x0":
    target = x0
  elif kind == "v":
    target = a * z - s * x0
  else:
    rho = s / a
    c_skip = SIGMA_DATA ** 2 / (rho ** 2 + SIGMA_DATA ** 2)
    c_out = rho * SIGMA_DATA / jnp.sqrt(rho ** 2 + SIGMA_DATA ** 2)
    target = (x0 - c_skip * x_t / a) / c_out
  np.testing.assert_allclose(got, jnp.mean((F - target) ** 2), rtol=1e-3)


def test_get_loss_fn_trains_every_parameterization_one_step():
  from sgm_jax.models.small import ScoreNet
  sde = SDES["vp"]
  model = ScoreNet(channels=(4, 8, 8, 8), embed_dim=8, embedding_type="positional")
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 17, 17, 1), minval=-1, maxval=1)
  # Jitted: op by op, the network's forward and backward passes were ~450 small compilations.
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x, jnp.zeros(2))["params"]
  for kind in ("eps", "x0", "v", "edm"):
    loss_fn = losses.get_loss_fn(sde, model, weighting="output", parameterization=kind)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, x, jax.random.PRNGKey(1))
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_bad_parameterizations_raise():
  sde = SDES["vp"]
  x = jnp.zeros(SHAPE)
  variables = Identity().init(jax.random.PRNGKey(0), x, jnp.zeros(SHAPE[0]))
  with pytest.raises(ValueError, match="'x1'.*valid values"):
    score_lib.get_score_fn(sde, Identity(), variables, True, parameterization="x1")
  with pytest.raises(ValueError, match="continuous-time"):
    score_lib.get_score_fn(sde, Identity(), variables, False, parameterization="v")
  with pytest.raises(ValueError, match="sigma_data"):
    score_lib.get_score_fn(sde, Identity(), variables, True, parameterization="edm",
                           sigma_data=0.0)
  with pytest.raises(ValueError, match="DSM loss only"):
    losses.get_loss_fn(sde, Identity(), kind="ssm", weighting="output", parameterization="v")
  with pytest.raises(ValueError, match="continuous losses"):
    losses.get_loss_fn(sde, Identity(), kind="ddpm", parameterization="v")
  with pytest.raises(ValueError, match="needs output_weight"):
    losses.dsm_loss(lambda x, t: x, sde, x, jax.random.PRNGKey(0), "output")
