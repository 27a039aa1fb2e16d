"""Forward SDEs of score-based generative modeling (Song et al., ICLR 2021).

Each SDE is an immutable, hashable dataclass (usable as a static argument of `jax.jit`) with pure
methods. Conventions follow score_sde: T = 1, `t` is a (B,) array (a scalar broadcasts), `x` is a
(B, ...) array, diffusions and stds are returned as (B,) arrays.

Every SDE here has Gaussian transition kernels x_t = alpha(t) x_0 + sigma(t) z, z ~ N(0, I)
(`marginal_prob`). What differs per SDE and is needed by samplers, losses and networks is a method
here (alpha, sigma, log-SNR and its inverse, time labels, sampling eps), never an isinstance chain.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def batch_expand(t: Array, x: Array) -> Array:
  """Reshape a (B,) array so it broadcasts against x of shape (B, ...); scalars pass through."""
  t = jnp.asarray(t)
  if t.ndim == 0:
    return t
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def batch_times(t: Array, x: Array, dtype=None) -> Array:
  """t as the (B,) time array of the batch x (a scalar broadcasts), in `dtype` (default: t's own
  floating dtype, the default float for integers)."""
  t = jnp.asarray(t, dtype)
  if not jnp.issubdtype(t.dtype, jnp.floating):
    t = t.astype(jnp.result_type(float))
  if t.ndim == 0:
    return jnp.broadcast_to(t, (x.shape[0],))
  if t.shape != (x.shape[0],):
    raise InputError(f"t must be a scalar or a ({x.shape[0]},) array for x of shape {x.shape}, "
                     f"got shape {t.shape}")
  return t


def _sum_except_batch(v: Array) -> Array:
  return v.reshape(v.shape[0], -1).sum(axis=-1)


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise InputError(message)


@dataclasses.dataclass(frozen=True)
class SDE:
  """Base class: dx = f(x, t) dt + g(t) dw on t in [0, T] with Gaussian marginals."""

  N: int = 1000

  def __post_init__(self):
    _check(isinstance(self.N, (int, np.integer)) and self.N >= 1,
           f"N (number of discretization steps) must be a positive integer, got {self.N!r}")

  # --- to be defined by every SDE -------------------------------------------------------------
  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Drift f(x, t) (shape of x) and diffusion g(t) (shape (B,))."""
    raise NotImplementedError

  def alpha(self, t: Array) -> Array:
    """Mean coefficient of the transition kernel: E[x_t | x_0] = alpha(t) x_0."""
    raise NotImplementedError

  def sigma(self, t: Array) -> Array:
    """Standard deviation of the transition kernel p_{0t}(x_t | x_0)."""
    raise NotImplementedError

  def t_from_log_snr(self, log_snr: Array) -> Array:
    """Inverse of `log_snr`."""
    raise NotImplementedError

  @property
  def prior_std(self) -> float:
    """The prior is N(0, prior_std^2 I)."""
    raise NotImplementedError

  @property
  def default_sampling_eps(self) -> float:
    """Smallest time samplers integrate to (score_sde: 1e-3 for VP/sub-VP, 1e-5 for VE)."""
    raise NotImplementedError

  # How a network's output becomes a score: 'score' (VE: the output is the score) or 'eps'
  # (VP/sub-VP: the output predicts the noise z, and score = -eps / network_std).
  network_output = "score"

  def time_label(self, t: Array, continuous: bool = True) -> Array:
    """What a score network is conditioned on for time t (score_sde conventions)."""
    raise NotImplementedError

  def network_std(self, t: Array, continuous: bool = True) -> Array:
    """The std that divides a noise prediction into a score."""
    return self.sigma(t)

  # --- shared ---------------------------------------------------------------------------------
  @property
  def T(self) -> float:
    return 1.0

  def marginal_prob(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Mean and std of p_{0t}(x_t | x_0): (alpha(t) x_0, sigma(t))."""
    return batch_expand(self.alpha(t), x) * x, self.sigma(t)

  def log_snr(self, t: Array) -> Array:
    """lambda(t) = log(alpha(t)^2 / sigma(t)^2), decreasing in t."""
    return 2.0 * (jnp.log(self.alpha(t)) - jnp.log(self.sigma(t)))

  def rho(self, t: Array) -> Array:
    """rho(t) = sigma(t) / alpha(t): the noise level of the scaled variable x / alpha (DEIS)."""
    return self.sigma(t) / self.alpha(t)

  def t_from_rho(self, rho: Array) -> Array:
    return self.t_from_log_snr(-2.0 * jnp.log(rho))

  def prior_sampling(self, key: Array, shape) -> Array:
    return self.prior_std * jax.random.normal(key, shape)

  def prior_logp(self, z: Array) -> Array:
    """log N(z; 0, prior_std^2 I), summed over all but the batch axis."""
    d = math.prod(z.shape[1:])
    s2 = self.prior_std ** 2
    return -0.5 * d * math.log(2 * math.pi * s2) - _sum_except_batch(z ** 2) / (2 * s2)

  def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
    """One forward step x_{i+1} = x_i + f_i + G_i z_i; Euler-Maruyama with dt = T / N by default."""
    dt = self.T / self.N
    drift, diffusion = self.sde(x, t)
    return drift * dt, diffusion * math.sqrt(dt)

  def reverse_drift(self, score_fn: ScoreFn, x: Array, t: Array,
                    probability_flow: bool = False) -> Array:
    """f - g^2 score (reverse SDE, Eq. 6) or f - g^2 score / 2 (probability flow, Eq. 13) in the
    dtype of x; t is a (B,) array or one time for the whole batch."""
    t = batch_times(t, x, x.dtype)
    drift, diffusion = self.sde(x, t)
    weight = 0.5 if probability_flow else 1.0
    score = score_fn(x, t).astype(x.dtype)
    return (drift - weight * batch_expand(diffusion ** 2, x) * score).astype(x.dtype)

  def probability_flow_drift(self, score_fn: ScoreFn, x: Array, t: Array) -> Array:
    """The drift of the probability-flow ODE (Eq. 13), as `reverse_drift`."""
    return self.reverse_drift(score_fn, x, t, probability_flow=True)

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
    return ReverseSDE(self, score_fn, probability_flow)


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
  """The reverse-time SDE (or probability-flow ODE) of `forward`, run from t = T to t = 0.

  `sde` returns the drift and diffusion in forward-time notation, dx = [f - g^2 s] dt + g dw_bar,
  with dt < 0; `discretize` returns (f_i, G_i) of one reverse step x_{i-1} = x_i - f_i + G_i z
  (score_sde's convention, Eq. 46-47 of the paper).
  """

  forward: SDE
  score_fn: ScoreFn
  probability_flow: bool = False

  @property
  def T(self) -> float:
    return self.forward.T

  @property
  def N(self) -> int:
    return self.forward.N

  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    _, diffusion = self.forward.sde(x, t)
    drift = self.forward.reverse_drift(self.score_fn, x, t, self.probability_flow)
    return drift, jnp.zeros_like(diffusion) if self.probability_flow else diffusion

  def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
    f, G = self.forward.discretize(x, t)
    weight = 0.5 if self.probability_flow else 1.0
    rev_f = f - weight * batch_expand(G ** 2, x) * self.score_fn(x, t)
    return rev_f, jnp.zeros_like(G) if self.probability_flow else G


def smld_sigmas(sigma_min: float, sigma_max: float, num_scales: int) -> Array:
  """The SMLD/NCSN noise levels as score_sde's networks index them (label 0 = sigma_max):
  geometric, from sigma_max down to sigma_min, in float32."""
  return jnp.exp(jnp.linspace(math.log(sigma_max), math.log(sigma_min), num_scales))


def _solve_increasing_quadratic(a: float, b: float, c: Array) -> Array:
  """Positive root t of a t^2 + b t = c (a >= 0, b > 0), stable for a -> 0."""
  return 2.0 * c / (b + jnp.sqrt(b * b + 4.0 * a * c))


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
  """Variance exploding SDE: dx = sigma_min (sigma_max/sigma_min)^t sqrt(2 log(sigma_max/sigma_min)) dw.

  As in score_sde, the kernel std is sigma(t) = sigma_min (sigma_max/sigma_min)^t, so the SDE's
  distribution at t = 0 is the data smoothed by N(0, sigma_min^2).
  """

  sigma_min: float = 0.01
  sigma_max: float = 50.0
  N: int = 1000

  def __post_init__(self):
    super().__post_init__()
    _check(self.sigma_min > 0, f"sigma_min must be > 0, got {self.sigma_min!r}")
    _check(self.sigma_max > self.sigma_min,
           f"sigma_max must be > sigma_min={self.sigma_min!r}, got {self.sigma_max!r}")

  @property
  def _log_ratio(self) -> float:
    return math.log(self.sigma_max / self.sigma_min)

  def sigma(self, t):
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** jnp.asarray(t)

  def alpha(self, t):
    return jnp.ones_like(jnp.asarray(t, dtype=jnp.result_type(float)))

  def sde(self, x, t):
    diffusion = self.sigma(t) * math.sqrt(2 * self._log_ratio)  # Eq. 30
    return jnp.zeros_like(x), diffusion

  def t_from_log_snr(self, log_snr):
    return (-0.5 * log_snr - math.log(self.sigma_min)) / self._log_ratio

  @property
  def prior_std(self):
    return self.sigma_max

  @property
  def default_sampling_eps(self):
    return 1e-5

  @property
  def discrete_sigmas(self) -> Array:
    """The N noise levels of SMLD/NCSN, geometric from sigma_min to sigma_max (`smld_sigmas`
    reversed)."""
    return jnp.flip(smld_sigmas(self.sigma_min, self.sigma_max, self.N))

  def timestep(self, t: Array) -> Array:
    """Index of the discrete noise level for t (truncated, as score_sde's SMLD steps; the 1e-4
    tolerance of `VPSDE.timestep`)."""
    return jnp.floor(jnp.asarray(t) * (self.N - 1) / self.T + 1e-4).astype(jnp.int32)

  def discretize(self, x, t):
    # SMLD: x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z (Eq. 45, sigma_{-1} = 0).
    i = self.timestep(t)
    sigmas = self.discrete_sigmas
    adjacent = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
    return jnp.zeros_like(x), jnp.sqrt(sigmas[i] ** 2 - adjacent ** 2)

  def time_label(self, t, continuous=True):
    # Continuous NCSN++ sees the noise level; discrete NCSN models index their sigmas, which
    # score_sde stores from sigma_max down, so t = 0 is the last index.
    if continuous:
      return self.sigma(t)
    return jnp.round((self.T - jnp.asarray(t)) * (self.N - 1)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class VPSDE(SDE):
  """Variance preserving SDE: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw, beta linear in t (Eq. 32)."""

  beta_min: float = 0.1
  beta_max: float = 20.0
  N: int = 1000
  network_output = "eps"

  def __post_init__(self):
    super().__post_init__()
    _check(self.beta_min >= 0, f"beta_min must be >= 0, got {self.beta_min!r}")
    _check(self.beta_max > self.beta_min,
           f"beta_max must be > beta_min={self.beta_min!r}, got {self.beta_max!r}")

  def beta(self, t: Array) -> Array:
    return self.beta_min + jnp.asarray(t) * (self.beta_max - self.beta_min)

  def integrated_beta(self, t: Array) -> Array:
    """B(t) = int_0^t beta(s) ds."""
    t = jnp.asarray(t)
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2

  def t_from_integrated_beta(self, B: Array) -> Array:
    return _solve_increasing_quadratic(0.5 * (self.beta_max - self.beta_min), self.beta_min, B)

  def sde(self, x, t):
    beta = self.beta(t)
    return -0.5 * batch_expand(beta, x) * x, jnp.sqrt(beta)

  def alpha(self, t):
    return jnp.exp(-0.5 * self.integrated_beta(t))  # Eq. 33

  def sigma(self, t):
    return jnp.sqrt(-jnp.expm1(-self.integrated_beta(t)))

  def log_snr(self, t):
    # log(alpha^2 / sigma^2) = -log(e^B - 1), written stably for small and large B.
    return -_log_expm1(self.integrated_beta(t))

  def t_from_log_snr(self, log_snr):
    return self.t_from_integrated_beta(jnp.logaddexp(0.0, -jnp.asarray(log_snr)))

  @property
  def prior_std(self):
    return 1.0

  @property
  def default_sampling_eps(self):
    return 1e-3

  @property
  def discrete_betas(self) -> Array:
    """DDPM's beta_1..beta_N = beta(t) / N on a uniform grid."""
    return jnp.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

  @property
  def alphas_cumprod(self) -> Array:
    return jnp.cumprod(1.0 - self.discrete_betas)

  def timestep(self, t: Array) -> Array:
    """Index of the DDPM step for t (truncated, as score_sde's DDPM steps).

    A tolerance of 1e-4 steps keeps t = i / (N - 1), which float32 may hold just below the exact
    value, on step i instead of i - 1.
    """
    return jnp.floor(jnp.asarray(t) * (self.N - 1) / self.T + 1e-4).astype(jnp.int32)

  def discretize(self, x, t):
    # DDPM: x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z (Eq. 47 of the paper).
    beta = self.discrete_betas[self.timestep(t)]
    return batch_expand(jnp.sqrt(1.0 - beta), x) * x - x, jnp.sqrt(beta)

  def time_label(self, t, continuous=True):
    # Continuous DDPM++ was trained on t * 999, discrete DDPM on the step t * (N - 1).
    return jnp.asarray(t) * (999.0 if continuous else self.N - 1)

  def network_std(self, t, continuous=True):
    if continuous:
      return self.sigma(t)
    return jnp.sqrt(1.0 - self.alphas_cumprod[self.timestep(t)])


def _log_expm1(B: Array) -> Array:
  """log(e^B - 1) for B > 0 without overflow or cancellation."""
  return jnp.where(B > 20.0, B + jnp.log1p(-jnp.exp(-jnp.minimum(B, 1e30))),
                   jnp.log(jnp.expm1(jnp.minimum(B, 20.0))))


@dataclasses.dataclass(frozen=True)
class subVPSDE(VPSDE):
  """Sub-VP SDE: dx = -beta x / 2 dt + sqrt(beta (1 - e^{-2 B(t)})) dw (Eq. 17)."""

  def sde(self, x, t):
    beta = self.beta(t)
    discount = -jnp.expm1(-2.0 * self.integrated_beta(t))
    return -0.5 * batch_expand(beta, x) * x, jnp.sqrt(beta * discount)

  def sigma(self, t):
    return -jnp.expm1(-self.integrated_beta(t))  # Eq. 29: std = 1 - e^{-B}

  def log_snr(self, t):
    B = self.integrated_beta(t)
    return -B - 2.0 * jnp.log(-jnp.expm1(-B))

  def t_from_log_snr(self, log_snr):
    # sigma / alpha = e^{B/2} - e^{-B/2} = 2 sinh(B/2) = e^{-lambda/2}.
    return self.t_from_integrated_beta(2.0 * jnp.arcsinh(0.5 * jnp.exp(-0.5 * jnp.asarray(log_snr))))

  def discretize(self, x, t):
    return SDE.discretize(self, x, t)  # score_sde uses Euler-Maruyama for sub-VP

  def time_label(self, t, continuous=True):
    return jnp.asarray(t) * 999.0  # score_sde feeds t * 999 to sub-VP models, discrete or not

  def network_std(self, t, continuous=True):
    return self.sigma(t)


@dataclasses.dataclass(frozen=True)
class TutorialSDE(SDE):
  """The score-SDE tutorial's dx = sigma^t dw (Song's Colab), with sigma^t the diffusion.

  Its kernel std is sqrt((sigma^{2t} - 1) / (2 log sigma)), zero at t = 0, so the SDE starts from
  the data itself. Networks see t directly.
  """

  sigma_base: float = 25.0
  N: int = 1000

  def __post_init__(self):
    super().__post_init__()
    _check(self.sigma_base > 1.0, f"sigma_base must be > 1, got {self.sigma_base!r}")

  @property
  def _log_s(self) -> float:
    return math.log(self.sigma_base)

  def sde(self, x, t):
    return jnp.zeros_like(x), self.sigma_base ** jnp.asarray(t)

  def alpha(self, t):
    return jnp.ones_like(jnp.asarray(t, dtype=jnp.result_type(float)))

  def sigma(self, t):
    return jnp.sqrt(jnp.expm1(2.0 * jnp.asarray(t) * self._log_s) / (2.0 * self._log_s))

  def t_from_log_snr(self, log_snr):
    return jnp.log1p(2.0 * self._log_s * jnp.exp(-jnp.asarray(log_snr))) / (2.0 * self._log_s)

  @property
  def prior_std(self):
    return math.sqrt(math.expm1(2.0 * self._log_s) / (2.0 * self._log_s))

  @property
  def default_sampling_eps(self):
    return 1e-3

  def time_label(self, t, continuous=True):
    return jnp.asarray(t, dtype=jnp.result_type(float))


SDES = {"vesde": VESDE, "vpsde": VPSDE, "subvpsde": subVPSDE, "tutorial": TutorialSDE}


def get_sde(name: str, **kwargs) -> SDE:
  """Build an SDE by its score_sde config name ('vesde', 'vpsde', 'subvpsde') or 'tutorial'."""
  key = name.lower()
  if key not in SDES:
    raise InputError(f"unknown SDE {name!r}; valid names are {sorted(SDES)}")
  return SDES[key](**kwargs)


def from_config(config) -> SDE:
  """The SDE of a score_sde-style config: config.training.sde ('vesde', 'vpsde', 'subvpsde',
  'tutorial') with the constants of config.model (sigma_min/max, beta_min/max, num_scales,
  sigma_base)."""
  name = str(config.training.sde).lower()
  m = config.model
  field = lambda key, default: m.get(key, default) if hasattr(m, "get") else getattr(m, key, default)
  n = int(field("num_scales", 1000))
  if name == "vesde":
    return VESDE(sigma_min=float(m.sigma_min), sigma_max=float(m.sigma_max), N=n)
  if name in ("vpsde", "subvpsde"):
    return SDES[name](beta_min=float(m.beta_min), beta_max=float(m.beta_max), N=n)
  if name == "tutorial":
    return TutorialSDE(sigma_base=float(field("sigma_base", 25.0)), N=n)
  raise InputError(f"unknown SDE {config.training.sde!r} (config.training.sde); valid values are "
                   f"{sorted(SDES)}")
