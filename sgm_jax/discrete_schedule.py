"""Discrete-time diffusion schedules (DDPM, diffusers) as a VP SDE, for pretrained networks.

A DDPM-style network is trained on N steps n = 0..N-1 with x_n = sqrt(abar_n) x_0 +
sqrt(1 - abar_n) z, abar_n = prod_{m <= n} (1 - beta_m) (`alphas_cumprod`). `DiscreteVPSchedule`
turns that table into a continuous-time VP SDE, so that every sampler of `sgm_jax.sampling` runs on
the network. Time follows DPM-Solver's `NoiseScheduleVP('discrete')` (Lu et al. 2022):

- step n sits at time t_n = (n + 1) / N, so t in [1/N, 1] covers the training steps and the
  network's time label is the continuous step n(t) = t N - 1 (`time_label`);
- B(t) = -2 log alpha(t) interpolates the knots B(k / N) = -log abar_{k-1}, k = 1..N, plus
  B(0) = 0 (alpha(0) = 1, sigma(0) = 0), so alpha(t_n)^2 = alphas_cumprod[n] exactly.

This is the VP SDE dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw (Song et al. 2021, Eq. 32) with
beta = dB/dt: f = d log alpha / dt = -beta / 2 and g^2 = d sigma^2 / dt - 2 f sigma^2 = beta are
exact for the interpolation, and alpha^2 + sigma^2 = 1 everywhere. `interpolation` chooses it:

- 'cubic' (default): the monotone cubic Hermite interpolant of B (Fritsch & Carlson 1980, scipy's
  PCHIP), so beta(t) is continuous and positive. Solvers that evaluate beta (the adaptive `ode`
  sampler, `likelihood`, Euler-Maruyama) need that: on a piecewise-constant beta dopri5's error
  control does not converge (on a 2-D mixture, 9e-4 from the exact flow at rtol 1e-7 and 1e-9,
  with 2,000 and 46,000 evaluations; with 'cubic', 1e-5 at rtol 1e-7 with 235).
- 'linear': B piecewise linear, DPM-Solver's own interpolation of log alpha; beta is piecewise
  constant, N log(abar_{n-1} / abar_n) on (t_{n-1}, t_n]. Samplers that only use alpha, sigma and
  the log-SNR (ddim, dpm_solver, heun, deis rhoab / rhork, ipndm) give DPM-Solver's schedule.

The two differ between the knots by about (B'' / N^2) / 8 in B (2.5e-6 for DDPM's linear betas),
what a network trained only at the knots cannot tell apart. `DiscreteVPSchedule` subclasses
`sde_lib.VPSDE` with this beta(t); `beta_min` and `beta_max` are derived: beta(0) and beta(T).

    from sgm_jax import discrete_schedule, sampling, score
    sched = discrete_schedule.DiscreteVPSchedule.linear()        # DDPM / diffusers 'linear', N=1000
    score_fn = score.score_fn_from_model(sched, apply_fn, prediction="epsilon")
    x0, nfe = sampling.get_sampler("dpm_solver", sched, shape, num_steps=10)(key, score_fn)

with apply_fn(x, timestep) -> the network's output, timestep = t N - 1 a (B,) float array.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError, check_positive, check_positive_int
from sgm_jax.sde_lib import SDE, VPSDE

Array = jax.Array

INTERPOLATIONS = ("cubic", "linear")
# A time at most this many steps above a knot counts as on the knot when the step is picked: t_n =
# (n + 1) / N held in float32 may land one ulp above it (it matters for the DDPM step index and a
# piecewise-constant beta; alpha and sigma are continuous).
_KNOT_TOLERANCE = 1e-4
# Newton iterations inverting a monotone cubic piece from the linear guess (quadratic convergence:
# 4 reach float64 precision on smooth schedules; the rest guard kinks such as cosine's max_beta).
_NEWTON_STEPS = 8


def _as_vector(name: str, values) -> np.ndarray:
  """values as a finite float64 vector of at least one entry, else an InputError naming it."""
  try:
    v = np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise InputError(f"{name} must be a 1-D array of numbers, got {type(values).__name__}") from e
  if v.ndim != 1 or v.size < 1:
    raise InputError(f"{name} must be a non-empty 1-D array, got shape {v.shape}")
  bad = np.flatnonzero(~np.isfinite(v))
  if bad.size:
    raise InputError(f"{name} must be finite; {name}[{bad[0]}]={float(v[bad[0]])!r}")
  return v


def _monotone_slopes(delta: np.ndarray) -> np.ndarray:
  """PCHIP's knot slopes (Fritsch & Butland; scipy.interpolate.PchipInterpolator) for unit steps
  with positive increments delta (N,): the harmonic mean of the adjacent increments inside, the
  shape-preserving three-point formula at the ends; (N + 1,), each in [0, 3 delta] of its pieces,
  so every cubic piece is monotone."""
  slopes = np.empty(delta.size + 1)
  if delta.size == 1:
    slopes[:] = delta[0]
    return slopes
  slopes[1:-1] = 2.0 / (1.0 / delta[:-1] + 1.0 / delta[1:])
  for end, d0, d1 in ((0, delta[0], delta[1]), (-1, delta[-1], delta[-2])):
    slopes[end] = min(max(0.5 * (3.0 * d0 - d1), 0.0), 3.0 * d0)
  return slopes


@dataclasses.dataclass(frozen=True, repr=False)
class DiscreteVPSchedule(VPSDE):
  """The VP SDE of a discrete DDPM schedule (see the module docstring), from `log_alphas_cumprod`
  (log abar_n, n = 0..N-1: negative and strictly decreasing) and `interpolation` ('cubic' or
  'linear'). Build it with `from_alphas_cumprod`, `from_betas`, `linear`, `scaled_linear`,
  `cosine`, `from_diffusers_config` or `from_sde`. It is hashable (a static argument of jax.jit)
  and compares by value."""

  # Derived in __post_init__, not arguments: N = len(log_alphas_cumprod), beta(0) and beta(T)
  # (VPSDE's fields, for code that reads them).
  N: int = dataclasses.field(init=False, default=0)
  beta_min: float = dataclasses.field(init=False, default=0.0)
  beta_max: float = dataclasses.field(init=False, default=0.0)
  log_alphas_cumprod: tuple = ()
  interpolation: str = "cubic"

  def __post_init__(self):
    if self.interpolation not in INTERPOLATIONS:
      raise InputError(f"unknown interpolation {self.interpolation!r}; valid values are "
                       f"{list(INTERPOLATIONS)}")
    la = _as_vector("log_alphas_cumprod", self.log_alphas_cumprod)
    if not np.all(la < 0.0):
      i = int(np.argmax(~(la < 0.0)))
      raise InputError(f"alphas_cumprod must lie in (0, 1); alphas_cumprod[{i}]="
                       f"{math.exp(la[i])!r} (log {la[i]!r})")
    if not np.all(np.diff(la) < 0.0):
      i = int(np.argmax(~(np.diff(la) < 0.0))) + 1
      raise InputError(f"alphas_cumprod must be strictly decreasing (every beta > 0); "
                       f"alphas_cumprod[{i}]={math.exp(la[i])!r} >= alphas_cumprod[{i - 1}]="
                       f"{math.exp(la[i - 1])!r}")
    object.__setattr__(self, "log_alphas_cumprod", tuple(float(v) for v in la))
    object.__setattr__(self, "N", la.size)
    _, c1, c2, c3 = self._pieces
    object.__setattr__(self, "beta_min", float(self.N * c1[0]))
    object.__setattr__(self, "beta_max", float(self.N * (c1[-1] + 2.0 * c2[-1] + 3.0 * c3[-1])))
    SDE.__post_init__(self)  # VPSDE's own check (beta_max > beta_min) is for its linear beta

  def __repr__(self):
    ac = np.exp(self._knots[1:])
    return (f"DiscreteVPSchedule(N={self.N}, alphas_cumprod[0]={ac[0]:.6g}, "
            f"alphas_cumprod[-1]={ac[-1]:.6g}, interpolation={self.interpolation!r})")

  # --- constructors ---------------------------------------------------------------------------
  @classmethod
  def from_alphas_cumprod(cls, alphas_cumprod, interpolation: str = "cubic"
                          ) -> "DiscreteVPSchedule":
    """From abar_n, n = 0..N-1 (diffusers' `scheduler.alphas_cumprod`), each in (0, 1),
    strictly decreasing."""
    ac = _as_vector("alphas_cumprod", alphas_cumprod)
    bad = np.flatnonzero(~((ac > 0.0) & (ac < 1.0)))
    if bad.size:
      i = bad[0]
      hint = (" (a zero-terminal-SNR schedule: clamp its last value to a small positive number "
              "such as 2**-24, as diffusers does)" if ac[i] == 0.0 else "")
      raise InputError(f"alphas_cumprod must lie in (0, 1); alphas_cumprod[{i}]="
                       f"{float(ac[i])!r}{hint}")
    return cls(log_alphas_cumprod=tuple(np.log(ac)), interpolation=interpolation)

  @classmethod
  def from_betas(cls, betas, interpolation: str = "cubic") -> "DiscreteVPSchedule":
    """From DDPM's beta_n, n = 0..N-1, each in (0, 1): abar_n = prod_{m <= n} (1 - beta_m),
    accumulated as a sum of log1p(-beta_m) in float64."""
    b = _as_vector("betas", betas)
    bad = np.flatnonzero(~((b > 0.0) & (b < 1.0)))
    if bad.size:
      raise InputError(f"betas must lie in (0, 1); betas[{bad[0]}]={float(b[bad[0]])!r}")
    return cls(log_alphas_cumprod=tuple(np.cumsum(np.log1p(-b))), interpolation=interpolation)

  @classmethod
  def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
             beta_end: float = 0.02, interpolation: str = "cubic") -> "DiscreteVPSchedule":
    """DDPM's (Ho et al. 2020) and diffusers' 'linear': betas linspace(beta_start, beta_end, N)."""
    n = check_positive_int("num_train_timesteps", num_train_timesteps)
    b0, b1 = check_positive("beta_start", beta_start), check_positive("beta_end", beta_end)
    return cls.from_betas(np.linspace(b0, b1, n, dtype=np.float64), interpolation)

  @classmethod
  def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                    beta_end: float = 0.012, interpolation: str = "cubic"
                    ) -> "DiscreteVPSchedule":
    """diffusers' 'scaled_linear' (Stable Diffusion, latent diffusion): betas
    linspace(sqrt(beta_start), sqrt(beta_end), N)^2."""
    n = check_positive_int("num_train_timesteps", num_train_timesteps)
    b0, b1 = check_positive("beta_start", beta_start), check_positive("beta_end", beta_end)
    return cls.from_betas(np.linspace(math.sqrt(b0), math.sqrt(b1), n, dtype=np.float64) ** 2,
                          interpolation)

  @classmethod
  def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999,
             interpolation: str = "cubic") -> "DiscreteVPSchedule":
    """The cosine schedule of improved DDPM (Nichol & Dhariwal 2021, Eq. 17), diffusers'
    'squaredcos_cap_v2': beta_n = min(1 - abar((n + 1) / N) / abar(n / N), max_beta) with
    abar(u) = cos((u + s) / (1 + s) pi / 2)^2."""
    n = check_positive_int("num_train_timesteps", num_train_timesteps)
    s = check_positive("s", s)
    if check_positive("max_beta", max_beta) >= 1.0:
      raise InputError(f"max_beta must be a float in (0, 1), got {max_beta!r}")
    abar = lambda u: np.cos((u + s) / (1.0 + s) * np.pi / 2.0) ** 2
    u = np.arange(n + 1, dtype=np.float64) / n
    return cls.from_betas(np.minimum(1.0 - abar(u[1:]) / abar(u[:-1]), max_beta), interpolation)

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], interpolation: str = "cubic"
                            ) -> "DiscreteVPSchedule":
    """From a diffusers scheduler config (its scheduler_config.json as a dict): `trained_betas`,
    or `beta_schedule` in BETA_SCHEDULES with `num_train_timesteps`, `beta_start`, `beta_end`.
    The config's `prediction_type` is for `score.score_fn_from_model`."""
    if config.get("rescale_betas_zero_snr", False):
      raise InputError("rescale_betas_zero_snr=True gives alphas_cumprod[-1] = 0 (infinite time); "
                       "build the schedule with from_alphas_cumprod after clamping that value")
    if config.get("trained_betas", None) is not None:
      return cls.from_betas(config["trained_betas"], interpolation)
    name = config.get("beta_schedule", "linear")
    if name not in BETA_SCHEDULES:
      raise InputError(f"unknown beta_schedule {name!r}; valid values are {sorted(BETA_SCHEDULES)}")
    kwargs = {"num_train_timesteps": config.get("num_train_timesteps", 1000)}
    if BETA_SCHEDULES[name] != "cosine":
      kwargs.update({k: config[k] for k in ("beta_start", "beta_end") if k in config})
    return getattr(cls, BETA_SCHEDULES[name])(interpolation=interpolation, **kwargs)

  @classmethod
  def from_sde(cls, sde: SDE, num_train_timesteps: int = 1000, interpolation: str = "cubic"
               ) -> "DiscreteVPSchedule":
    """The discrete schedule of a VP SDE at t_n = (n + 1) / N: abar_n = alpha(t_n)^2 (float64).
    Between the steps it differs from the SDE by the interpolation of B = -2 log alpha."""
    n = check_positive_int("num_train_timesteps", num_train_timesteps)
    t = np.arange(1, n + 1, dtype=np.float64) / n
    with jax.enable_x64(True):
      alpha = np.asarray(sde.alpha(jnp.asarray(t)), np.float64)
      sigma = np.asarray(sde.sigma(jnp.asarray(t)), np.float64)
    if not np.allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=0.0, atol=1e-9):
      raise InputError(f"{type(sde).__name__} is not variance preserving (alpha^2 + sigma^2 != 1); "
                       "a discrete DDPM schedule can only stand for a VP SDE")
    return cls(log_alphas_cumprod=tuple(2.0 * np.log(alpha)), interpolation=interpolation)

  # --- the tables -----------------------------------------------------------------------------
  @functools.cached_property
  def _knots(self) -> np.ndarray:
    """log alpha(t)^2 = -B(t) at t = k / N, k = 0..N (float64): 0, then log abar_0..abar_{N-1}."""
    return np.concatenate([[0.0], np.asarray(self.log_alphas_cumprod, np.float64)])

  @functools.cached_property
  def _pieces(self) -> np.ndarray:
    """(4, N) float64: B at the left knot, and the cubic's coefficients c1, c2, c3 on step k = 1..N,
    B = B_{k-1} + c1 u + c2 u^2 + c3 u^3 in u = t N - (k - 1) in [0, 1] (dB/du = c1 at u = 0)."""
    B = -self._knots
    delta = np.diff(B)
    if self.interpolation == "linear":
      left = right = delta
    else:
      slopes = _monotone_slopes(delta)
      left, right = slopes[:-1], slopes[1:]
    return np.stack([B[:-1], left, 3.0 * delta - 2.0 * left - right, left + right - 2.0 * delta])

  @property
  def alphas_cumprod(self) -> Array:
    """abar_n, n = 0..N-1 (the table the schedule was built from)."""
    return jnp.exp(jnp.asarray(self.log_alphas_cumprod))

  @property
  def discrete_betas(self) -> Array:
    """DDPM's beta_n = 1 - abar_n / abar_{n-1} (abar_{-1} = 1)."""
    return -jnp.expm1(jnp.asarray(np.diff(self._knots)))

  def _piece(self, t: Array, knot_below: bool = False) -> tuple[Array, Array, Array]:
    """Float t, the step k in 1..N whose piece [(k-1)/N, k/N] holds t, and u = t N - (k - 1).

    With knot_below, a knot (within _KNOT_TOLERANCE) belongs to the step below it, the side a
    reverse-time step from the knot integrates over: for what is piecewise constant (the DDPM step
    index, 'linear''s beta). Continuous quantities use the piece that holds t exactly.
    """
    t = _float(t)
    s = t * self.N
    k = jnp.ceil(s - _KNOT_TOLERANCE) if knot_below else jnp.floor(s) + 1.0
    k = jnp.clip(k, 1, self.N)
    return t, k.astype(jnp.int32), s - (k - 1.0).astype(t.dtype)

  # --- VPSDE with the interpolated beta(t) ----------------------------------------------------
  def integrated_beta(self, t: Array) -> Array:
    """B(t) = -2 log alpha(t), interpolated between the knots k / N (see `interpolation`)."""
    t, k, u = self._piece(t)
    b0, c1, c2, c3 = jnp.asarray(self._pieces, t.dtype)[:, k - 1]
    return b0 + u * (c1 + u * (c2 + u * c3))

  def beta(self, t: Array) -> Array:
    """beta(t) = dB/dt: continuous and piecewise quadratic ('cubic'), or constant on each step
    ('linear': N log(abar_{n-1} / abar_n) on (t_{n-1}, t_n])."""
    t, k, u = self._piece(t, knot_below=True)
    _, c1, c2, c3 = jnp.asarray(self._pieces, t.dtype)[:, k - 1]
    return self.N * (c1 + u * (2.0 * c2 + 3.0 * u * c3))

  def t_from_integrated_beta(self, B: Array) -> Array:
    """Inverse of `integrated_beta` on [0, T]: the step by bisection of the knots, then the
    monotone cubic by Newton's method (exact at once for 'linear'); B outside [0, B(T)] maps to
    0 or T."""
    B = _float(B)
    knots = -jnp.asarray(self._knots, B.dtype)
    k = jnp.clip(jnp.searchsorted(knots, B, side="left"), 1, self.N)
    b0, c1, c2, c3 = jnp.asarray(self._pieces, B.dtype)[:, k - 1]
    delta = knots[k] - knots[k - 1]
    target = B - b0
    u = jnp.clip(target / delta, 0.0, 1.0)
    if self.interpolation != "linear":
      tiny = jnp.finfo(B.dtype).tiny
      for _ in range(_NEWTON_STEPS):
        value = u * (c1 + u * (c2 + u * c3)) - target
        slope = c1 + u * (2.0 * c2 + 3.0 * u * c3)
        u = jnp.clip(u - value / jnp.maximum(slope, tiny), 0.0, 1.0)
    return ((k - 1).astype(B.dtype) + u) / self.N

  @property
  def default_sampling_eps(self) -> float:
    """t_0 = 1 / N, the first training step (DPM-Solver's default end time for discrete models)."""
    return 1.0 / self.N

  def timestep(self, t: Array) -> Array:
    """The DDPM step n whose forward update x_{n-1} -> x_n ends at t (t in (t_{n-1}, t_n]), for
    `discretize` (DDPM's ancestral step with beta_n)."""
    return self._piece(t, knot_below=True)[1] - 1

  def time_label(self, t: Array, continuous: bool = True) -> Array:
    """The network's timestep for time t: the continuous step n(t) = t N - 1, which equals n at
    t_n = (n + 1) / N (DPM-Solver's (t - 1/N) 1000 for N = 1000). Samplers' times fall between
    the training steps; round inside apply_fn if a network only takes integers. `continuous` is
    accepted for the SDE interface and ignored."""
    return _float(t) * self.N - 1.0

  def t_from_timestep(self, timestep: Array) -> Array:
    """Inverse of `time_label`: t = (n + 1) / N."""
    return (_float(timestep) + 1.0) / self.N

  def network_std(self, t: Array, continuous: bool = True) -> Array:
    """sigma(t): the std an eps prediction is divided by (exact at the training steps)."""
    return self.sigma(t)


def _float(t) -> Array:
  t = jnp.asarray(t)
  return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.result_type(float))


# diffusers' beta_schedule names -> constructor (BETA_SCHEDULES[name] is a classmethod name).
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "squaredcos_cap_v2": "cosine", "cosine": "cosine"}
