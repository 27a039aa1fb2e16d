"""Reference solutions on the Gaussian-mixture oracle, shared by the sampler tests."""
import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import toy


def exact_flow_map(gm: toy.GaussianMixture, sde, x_T, t_start: float, t_end: float,
                   tol: float = 1e-9):
  """Integrate the probability-flow ODE of the oracle from t_start to t_end in float64.

  Call it inside `jax.enable_x64(True)`; x_T is converted to float64.
  """
  gm64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) if a.dtype.kind == "f" else a, gm)
  x_T = jnp.asarray(x_T, jnp.float64)
  shape = x_T.shape

  def vector_field(t, y, args):
    x = y.reshape(shape)
    tb = jnp.full((shape[0],), t, jnp.float64)
    return sde.probability_flow_drift(gm64.score_fn(sde), x, tb).reshape(-1)

  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), diffrax.Dopri8(), t0=t_start, t1=t_end, dt0=None,
      y0=x_T.reshape(-1), stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
      max_steps=100_000)
  return np.asarray(sol.ys[-1].reshape(shape))


def digits_oracle(num_images: int = 64, std: float = 0.1) -> toy.GaussianMixture:
  """A small digits mixture, cheap enough for convergence tests."""
  return toy.GaussianMixture.from_digits(std=std, num_images=num_images)


class CountingScore:
  """A score function that counts its evaluations at run time: a debug callback runs once per
  executed call, inside scan and while loops too (diffrax's rejected steps included)."""

  def __init__(self, fn):
    self.fn, self.count = fn, 0

  def _increment(self):
    self.count += 1

  def __call__(self, x, t):
    jax.debug.callback(self._increment)
    return self.fn(x, t)

  def run(self, sampler, key, x_T=None):
    """sampler(key, self, x_T), with count reset before and complete after."""
    self.count = 0
    out = sampler(key, self, x_T)
    jax.effects_barrier()
    return out
