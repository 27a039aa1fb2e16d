"""Inpainting and colorization by replacing known coordinates (Song et al., ICLR 2021, App. I.2-3).

An inverse problem with known coordinates Omega(x) = y is solved by running a sampler on the
unconditional score and, after every update at time t, overwriting the known coordinates with a
sample of the forward-perturbed data
    y_t = alpha(t) y + sigma(t) z,   z ~ N(0, I)            (the kernel p_{0t}, Eq. 29-33),
so the unknown coordinates follow the reverse dynamics of p_t(x_unknown | y_t). The paper derives
this from the conditional reverse SDE (Eq. 48) with the approximation p_t(x(t) | y) ~ p_t(x(t) |
y_t) for one draw y_t ~ p_{0t}(. | y). It is exact only where y_t carries the evidence of y, i.e.
at noise levels small against the data's own spread. Measured on Gaussian-mixture oracles
(tests/test_controllable.py): PC with a Langevin corrector follows the exact conditional when the
unknown coordinates' modes overlap (separation <~ component std); with well separated unknown
modes the component weights are pulled towards the prior ones (a weight of 0.61 instead of 0.75
for two equal-weight components whose unknown coordinates lie 4 stds apart). Deterministic
samplers have no corrector to re-equilibrate the unknown coordinates and are biased more (0.52
there), even where PC is accurate.

Colorization applies the same replacement in a decoupled colour space: an orthogonal 3x3 matrix M
whose first row is the gray direction (1, 1, 1) / sqrt(3) maps each RGB pixel to (gray, two chroma
channels); the gray channel is known. M is orthogonal, so M z ~ N(0, I) and the forward kernel is
the same in either space.

Samplers (one jit-compiled lax.scan each; built once, then called):
  'pc'    predictor-corrector (Algorithms 2-3) with replacement after the predictor and after each
          corrector step, the paper's method. Known noise is fresh at each replacement.
  'deis'  tAB-DEIS / rhoAB-DEIS (Zhang & Chen 2023) multistep exponential integrator.
  'ddim'  DDIM (eta = 0), the order-0 exponential integrator.
  'ode'   fixed-step Euler or Heun on the probability-flow ODE (Eq. 13).
Deterministic samplers use one fixed noise z per trajectory by default (known_noise='fixed'), so
the known coordinates follow the straight path alpha(t) y + sigma(t) z, which is what a
deterministic ODE trajectory through a point mass looks like; 'fresh' redraws it at every step.
The returned images carry the given known coordinates exactly.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sgm_jax.errors import InputError
from sgm_jax.sampling import base, pc
from sgm_jax.sampling import deis_coefficients as dc
from sgm_jax.sde_lib import SDE

Array = jax.Array

METHODS = ("pc", "deis", "ddim", "ode")
KNOWN_NOISE = ("fresh", "fixed")
ODE_SOLVERS = ("euler", "heun")

_OPTIONS = {
    "pc": ("predictor", "corrector", "snr", "n_steps_each", "probability_flow", "denoise", "eps",
           "time_grid", "known_noise"),
    "deis": ("method", "order", "time_grid", "grid_order", "eps", "known_noise"),
    "ddim": ("time_grid", "eps", "known_noise"),
    "ode": ("solver", "time_grid", "eps", "denoise", "known_noise"),
}


# --- the colour basis -------------------------------------------------------------------------
def _color_basis() -> np.ndarray:
  """Rows: gray (1, 1, 1)/sqrt(3), then two orthonormal chroma directions (App. I.3)."""
  return np.array([[1.0, 1.0, 1.0] / np.sqrt(3.0),
                   [-2.0, 1.0, 1.0] / np.sqrt(6.0),
                   [0.0, 1.0, -1.0] / np.sqrt(2.0)])


COLOR_BASIS = _color_basis()  # float64, orthogonal: COLOR_BASIS @ COLOR_BASIS.T = I


def decouple(rgb: Array) -> Array:
  """RGB (..., 3) -> decoupled (gray * sqrt(3), chroma_1, chroma_2): u = M x per pixel."""
  return jnp.einsum("...i,ji->...j", rgb, jnp.asarray(COLOR_BASIS, rgb.dtype))


def couple(u: Array) -> Array:
  """Inverse of `decouple`: x = M^T u (M is orthogonal)."""
  return jnp.einsum("...j,ji->...i", u, jnp.asarray(COLOR_BASIS, u.dtype))


def to_gray(images: Array) -> Array:
  """(..., 1) gray values: (R + G + B) / 3 of (..., 3) images; (..., 1) images as they are."""
  if images.shape[-1] == 1:
    return images
  if images.shape[-1] != 3:
    raise InputError(f"gray images must have 1 or 3 channels, got shape {images.shape}")
  return jnp.mean(images, axis=-1, keepdims=True)


# --- option checking ---------------------------------------------------------------------------
def _known_noise(method: str, options: dict) -> str:
  value = options.get("known_noise", "fresh" if method == "pc" else "fixed")
  base.check_choice("known_noise", value, KNOWN_NOISE)
  return value


def _grid(sde: SDE, options: dict, default: str, num_steps: int) -> np.ndarray:
  return base.sampling_grid(sde, options.get("time_grid", default), num_steps, options.get("eps"))


# --- the replacement driver ---------------------------------------------------------------------
class _Replacement:
  """Known-coordinate replacement in the space u = P x (P = COLOR_BASIS, or None: u = x)."""

  def __init__(self, basis: Optional[np.ndarray]):
    self.basis = basis

  def project(self, x: Array, known_u: Array, mask: Array) -> Array:
    """Overwrite the known coordinates (mask True, in u-space) of x by known_u."""
    if self.basis is None:
      return jnp.where(mask, known_u, x)
    return couple(jnp.where(mask, known_u, decouple(x)))


def _build(method: str, sde: SDE, shape: tuple, num_steps: int, options: dict,
           basis: Optional[np.ndarray]) -> tuple[Callable, dict]:
  """run(key, score_fn, data_u, mask) -> (x, nfe), data_u and mask in the replacement space."""
  base.check_choice("inpainting method", method, METHODS)
  base.check_options(f"inpaint/{method}", options, _OPTIONS[method])
  if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
    raise InputError(f"num_steps must be a positive integer, got {num_steps!r}")
  noise_mode = _known_noise(method, options)
  repl = _Replacement(basis)
  builder = {"pc": _pc_steps, "deis": _deis_steps, "ddim": _deis_steps, "ode": _ode_steps}[method]
  ts, loop, nfe, denoise, info = builder(method, sde, shape, num_steps, dict(options))
  alpha, sigma = base.on_host(sde.alpha, ts), base.on_host(sde.sigma, ts)

  def run(key, score_fn, data_u, mask):
    key_init, key_known, key_steps = jax.random.split(key, 3)
    dtype = data_u.dtype
    a_, s_ = jnp.asarray(alpha, dtype), jnp.asarray(sigma, dtype)
    fixed_z = jax.random.normal(key_known, shape, dtype)

    def known_at(i, slot):
      """alpha(t_i) y + sigma(t_i) z: the forward-perturbed known coordinates at grid point i."""
      if noise_mode == "fixed":
        z = fixed_z
      else:
        z = base.step_normal(key_known, i, slot, fixed_z)
      return a_[i] * data_u + s_[i] * z

    def project(x, i, slot):
      return repl.project(x, known_at(i, slot), mask)

    x = project(sde.prior_sampling(key_init, shape).astype(dtype), 0, 0)  # x_T, known replaced
    x = loop(key_steps, score_fn, x, project)
    if denoise:
      x = base.tweedie_denoise(score_fn, x, jnp.asarray(ts[-1], dtype), a_[-1], s_[-1])
    x = repl.project(x, data_u, mask)  # the result carries the given known coordinates
    return x, jnp.asarray(nfe, jnp.int32)

  info.update(method=method, known_noise=noise_mode, nfe=nfe, ts=ts, denoise=denoise)
  return run, info


# --- predictor-corrector ------------------------------------------------------------------------
def _pc_steps(method, sde, shape, num_steps, options):
  predictor = options.get("predictor", "reverse_diffusion")
  corrector = options.get("corrector", "langevin")
  snr = options.get("snr", 0.16)
  n_each = options.get("n_steps_each", 1)
  probability_flow = base.bool_option(options, "probability_flow")
  denoise = base.bool_option(options, "denoise")
  predictor, corrector = pc.predictor_corrector_names(predictor, corrector)
  if predictor == "none" and corrector == "none":
    raise InputError("predictor and corrector cannot both be 'none'")
  if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not snr > 0:
    raise InputError(f"snr must be a positive float, got {snr!r}")
  if isinstance(n_each, bool) or not isinstance(n_each, (int, np.integer)) or n_each < 1:
    raise InputError(f"n_steps_each must be a positive integer, got {n_each!r}")
  if predictor == "ancestral" and probability_flow:
    raise InputError("probability_flow is not defined for the 'ancestral' predictor")
  ts = _grid(sde, options, "uniform", num_steps)
  alpha, sigma = base.on_host(sde.alpha, ts), base.on_host(sde.sigma, ts)
  coeffs = pc._step_coefficients(alpha, sigma, base.on_host(sde.log_snr, ts))
  form = None
  if predictor == "ancestral":
    probe = np.union1d(ts, np.linspace(ts[-1], ts[0], 65))
    form = pc._ancestral_form(sde, base.on_host(sde.alpha, probe), base.on_host(sde.sigma, probe))
  n_corr = int(n_each) if corrector != "none" else 0
  nfe = num_steps * ((predictor != "none") + n_corr) + int(denoise)
  table = dict(coeffs, t=ts[:-1], s=ts[1:], h=ts[:-1] - ts[1:], sigma_s=sigma[1:])

  def predict(score_fn, x, c, z):
    if predictor == "euler_maruyama":
      return pc.euler_maruyama_step(sde, score_fn, x, c["t"], c["h"], z, probability_flow)
    if predictor == "reverse_diffusion":
      return pc.reverse_diffusion_step(score_fn, x, c["t"], c["a"], c["G2"], z, probability_flow)
    if form == "smld":
      return pc.smld_ancestral_step(score_fn, x, c["t"], c["G2"], c["P"], z)
    return pc.ddpm_ancestral_step(score_fn, x, c["t"], c["a"], c["beta"], z)

  def correct(score_fn, x, c, z):
    if corrector == "langevin":
      return pc.langevin_step(score_fn, x, c["s"], z, snr)
    return pc.ald_step(score_fn, x, c["s"], z, snr, c["sigma_s"])

  def loop(key, score_fn, x, project):
    xs = {k: jnp.asarray(v, x.dtype) for k, v in table.items()}
    xs["i"] = jnp.arange(num_steps, dtype=jnp.int32)

    def step(x, c):
      i = c["i"]
      if predictor != "none":  # t_i -> t_{i+1}, then replace at t_{i+1}
        x = project(predict(score_fn, x, c, base.step_normal(key, i, 0, x)), i + 1, 0)

      def corrector_step(x, j):  # Langevin at t_{i+1}, then replace at t_{i+1}
        x = correct(score_fn, x, c, base.step_normal(key, i, j + 1, x))
        return project(x, i + 1, j + 1), None

      if n_corr:
        x, _ = lax.scan(corrector_step, x, jnp.arange(n_corr, dtype=jnp.int32))
      return x, None

    x, _ = lax.scan(step, x, xs)
    return x

  info = dict(predictor=predictor, corrector=corrector, snr=snr, n_steps_each=n_each,
              probability_flow=probability_flow)
  return ts, loop, nfe, denoise, info


# --- DEIS (tAB / rhoAB) and DDIM -----------------------------------------------------------------
def _deis_steps(method, sde, shape, num_steps, options):
  if method == "ddim":
    ts = _grid(sde, options, "uniform", num_steps)
    dc.check_grid(sde, ts)
    coef = dc.sde_coefficients(sde, ts)
    psi = coef["alpha"][1:] / coef["alpha"][:-1]
    C = dc.ddim_coefficients(sde, ts)[:, None]
    info = {}
  else:
    kind = options.get("method", "tab")
    base.check_choice("DEIS method", kind, ("tab", "rhoab"))
    order = options.get("order", 3)
    if not dc.order_is_valid(order, 0, 3):
      raise InputError(f"order of DEIS {kind!r} must be one of [0, 1, 2, 3], got {order!r}")
    from sgm_jax.sampling import deis
    ts = deis._time_grid(sde, num_steps, options.get("time_grid", deis.DEFAULT_TIME_GRID),
                         options.get("grid_order"), options.get("eps", sde.default_sampling_eps))
    make = dc.exponential_ab_coefficients if kind == "tab" else dc.rho_ab_coefficients
    psi, C = make(sde, ts, int(order))
    info = dict(deis_method=kind, order=int(order))
  sigma = dc.sde_coefficients(sde, ts)["sigma"][:-1]
  history = C.shape[1] - 1

  def loop(key, score_fn, x, project):
    dtype = x.dtype
    xs = (jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(ts[:-1], dtype),
          jnp.asarray(sigma, dtype), jnp.asarray(psi, dtype), jnp.asarray(C, dtype))

    def step(carry, row):
      x, past = carry
      i, t, sigma_t, psi_k, C_k = row
      eps = -sigma_t * base.eval_score(score_fn, x, t)  # eps_theta = -sigma score
      evals = jnp.concatenate([eps[None], past], axis=0)
      x = psi_k * x + jnp.tensordot(C_k, evals, axes=1)  # exponential multistep update
      return (project(x, i + 1, 0), evals[:history]), None

    past = jnp.zeros((history,) + x.shape, dtype)
    (x, _), _ = lax.scan(step, (x, past), xs)
    return x

  return ts, loop, num_steps, False, info


# --- probability-flow ODE, fixed steps -----------------------------------------------------------
def _ode_steps(method, sde, shape, num_steps, options):
  solver = options.get("solver", "euler")
  base.check_choice("solver", solver, ODE_SOLVERS)
  denoise = base.bool_option(options, "denoise")
  ts = _grid(sde, options, "uniform", num_steps)
  per_step = 1 if solver == "euler" else 2
  nfe = per_step * num_steps + int(denoise)

  def drift(score_fn, x, t):
    tb = jnp.full((x.shape[0],), t, x.dtype)
    cast = lambda y, tt: score_fn(y, tt).astype(y.dtype)
    return sde.probability_flow_drift(cast, x, tb).astype(x.dtype)

  def loop(key, score_fn, x, project):
    dtype = x.dtype
    xs = (jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(ts[:-1], dtype),
          jnp.asarray(ts[1:], dtype))

    def step(x, row):
      i, t, s = row
      h = s - t  # negative: integrating from T down to eps
      d = drift(score_fn, x, t)
      if solver == "euler":
        x = x + h * d
      else:  # Heun: trapezoid of the slopes at both ends
        x = x + 0.5 * h * (d + drift(score_fn, x + h * d, s))
      return project(x, i + 1, 0), None

    x, _ = lax.scan(step, x, xs)
    return x

  return ts, loop, nfe, denoise, dict(solver=solver)


# --- public API ----------------------------------------------------------------------------
class Inpainter:
  """A built inpainter: `inpaint(key, score_fn, images, mask) -> (x, nfe)`, one jit program.

  mask is 1 (True) where a pixel is known; it broadcasts against `images` (e.g. (H, W, 1)).
  """

  def __init__(self, method: str, sde: SDE, shape: tuple, num_steps: int, /, **options: Any):
    self.shape = tuple(int(d) for d in shape)
    if len(self.shape) < 2 or any(d < 1 for d in self.shape):
      raise InputError(f"shape must be a batch shape (B, ...) of positive sizes, got {shape!r}")
    run, self.info = _build(method, sde, self.shape, num_steps, options, None)
    self.method = method
    self._run = jax.jit(run)

  def __call__(self, key: Array, score_fn: Callable, images: Array, mask: Array):
    images = jnp.asarray(images)
    if tuple(images.shape) != self.shape:
      raise InputError(f"images have shape {tuple(images.shape)}, but this inpainter was built "
                       f"for shape {self.shape}")
    mask = jnp.broadcast_to(jnp.asarray(mask) > 0.5, self.shape)
    return self._run(key, base.as_traceable(score_fn), images, mask)

  def __repr__(self):
    return f"Inpainter({self.method!r}, shape={self.shape}, nfe={self.info['nfe']})"


class Colorizer:
  """A built colorizer: `colorize(key, score_fn, gray_images) -> (rgb, nfe)`, one jit program.

  gray_images are (B, H, W, 1) gray values or (B, H, W, 3) images whose gray value (the channel
  mean) is kept; the result has the same gray value to float precision.
  """

  def __init__(self, method: str, sde: SDE, shape: tuple, num_steps: int, /, **options: Any):
    self.shape = tuple(int(d) for d in shape)
    if len(self.shape) < 2 or self.shape[-1] != 3:
      raise InputError(f"colorization needs RGB batch shape (B, ..., 3), got {shape!r}")
    run, self.info = _build(method, sde, self.shape, num_steps, options, COLOR_BASIS)
    self.method = method
    mask = np.zeros(self.shape, bool)
    mask[..., 0] = True  # the gray channel of the decoupled space is known
    self._mask = mask

    def colorize(key, score_fn, gray):
      rgb_gray = jnp.broadcast_to(to_gray(gray), self.shape)
      return run(key, score_fn, decouple(rgb_gray), jnp.asarray(self._mask))

    self._run = jax.jit(colorize)

  def __call__(self, key: Array, score_fn: Callable, gray_images: Array):
    gray_images = jnp.asarray(gray_images)
    if tuple(gray_images.shape[:-1]) != self.shape[:-1] or gray_images.shape[-1] not in (1, 3):
      raise InputError(f"gray_images have shape {tuple(gray_images.shape)}; expected "
                       f"{self.shape[:-1] + (1,)} or {self.shape}")
    return self._run(key, base.as_traceable(score_fn), gray_images)

  def __repr__(self):
    return f"Colorizer({self.method!r}, shape={self.shape}, nfe={self.info['nfe']})"


def get_inpainter(method: str, sde: SDE, shape, num_steps: int = 1000, /,
                  **options) -> Inpainter:
  """Inpainter `method` in METHODS producing batches of `shape` in `num_steps` steps.

  Options: pc: predictor, corrector, snr, n_steps_each, probability_flow, denoise, eps,
  time_grid (as sampler 'pc'); deis: method ('tab' | 'rhoab'), order (3), time_grid
  ('quadratic'), grid_order, eps; ddim: time_grid ('uniform'), eps; ode: solver ('euler' |
  'heun'), time_grid ('uniform'), eps, denoise. All: known_noise ('fresh' for pc, 'fixed' for the
  deterministic samplers).
  """
  return Inpainter(method, sde, shape, num_steps, **options)


def get_colorizer(method: str, sde: SDE, shape, num_steps: int = 1000, /,
                  **options) -> Colorizer:
  """Colorizer `method` in METHODS for RGB batches of `shape` (B, H, W, 3); options as for
  `get_inpainter`."""
  return Colorizer(method, sde, shape, num_steps, **options)
