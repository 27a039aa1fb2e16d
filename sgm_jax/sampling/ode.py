"""Probability-flow ODE sampler (Song et al., ICLR 2021, Eq. 13) through one diffrax.diffeqsolve.

    dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t),   integrated from t = T down to t = eps.

Adaptive solvers (dopri5, tsit5) use a PID step-size controller with rtol = atol = 1e-5 (score_sde
used scipy's RK45 with these tolerances) and ignore num_steps. Fixed-step solvers (euler, heun,
rk4) take num_steps steps on a time grid from schedules.py.

nfe is what diffrax evaluates: an explicit s-stage Runge-Kutta method costs s evaluations per step;
FSAL methods (dopri5, tsit5: s = 7) reuse their last stage, so they cost 6 per attempted step
(accepted or rejected) plus 1 for the first stage of the first step. Adaptive solves start from a
fixed first step of 1% of [eps, T] (no evaluations spent choosing it).
"""
from __future__ import annotations

from typing import Callable, ClassVar

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError, check_positive
from sgm_jax.sampling import base
from sgm_jax.sde_lib import SDE

Array = jax.Array


class RK4(diffrax.AbstractERK):
  """The classical 4th-order Runge-Kutta method as a Butcher tableau (no embedded error estimate,
  so it is for fixed steps only)."""

  tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
      c=np.array([0.5, 0.5, 1.0]),
      b_sol=np.array([1.0, 2.0, 2.0, 1.0]) / 6.0,
      b_error=np.zeros(4),
      a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
  )
  interpolation_cls: ClassVar[Callable] = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

  def order(self, terms):
    return 4


# name -> (diffrax solver class, adaptive step size)
SOLVERS = {
    "dopri5": (diffrax.Dopri5, True),
    "tsit5": (diffrax.Tsit5, True),
    "euler": (diffrax.Euler, False),
    "heun": (diffrax.Heun, False),
    "rk4": (RK4, False),
}


def solver_evaluations(solver_cls) -> tuple[int, int]:
  """(vector-field evaluations per attempted step, once-only evaluations) of an explicit RK
  method: s stages per step, or s - 1 plus the very first stage for FSAL tableaus."""
  tableau = getattr(solver_cls, "tableau", None)
  if tableau is None:  # diffrax.Euler is not written as a tableau
    return 1, 0
  return tableau.num_stages - int(tableau.fsal), int(tableau.fsal)


_FIRST_STEP_FRACTION = 0.01  # adaptive solvers: first step as a fraction of T - eps


class HookedSolver(diffrax.AbstractWrappedSolver):
  """A fixed-step solver whose every step ends with hook(y1, t1, key), key folded from the step
  number (base.apply_hook). Not for FSAL tableaus, whose reused last stage would miss the hook.

  diffeqsolve runs its solver in the time -t when t1 < t0, so a reverse-time solve passes
  time_sign=-1 for the hook to see the time t itself.
  """

  solver: diffrax.AbstractSolver
  hook: Callable
  key: Array
  time_sign: float = 1.0

  @property
  def term_structure(self):
    return self.solver.term_structure

  @property
  def interpolation_cls(self):
    return self.solver.interpolation_cls

  def order(self, terms):
    return self.solver.order(terms)

  def init(self, terms, t0, t1, y0, args):
    return self.solver.init(terms, t0, t1, y0, args), jnp.zeros((), jnp.int32)

  def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
    state, i = solver_state
    y1, error, dense, state, result = self.solver.step(terms, t0, t1, y0, args, state, made_jump)
    y1 = base.apply_hook(self.hook, self.key, y1, self.time_sign * t1, i)
    return y1, error, dense, (state, i + 1), result

  def func(self, terms, t0, y0, args):
    return self.solver.func(terms, t0, y0, args)


def build_ode_sampler(sde: SDE, shape: tuple, num_steps: int, **options) -> base.Sampler:
  """Probability-flow ODE sampler.

  Options: solver in SOLVERS ('dopri5'), rtol and atol (1e-5, adaptive solvers), max_steps (4096,
  adaptive solvers), time_grid ('uniform', fixed-step solvers), eps (sde.default_sampling_eps),
  denoise (False: final Tweedie step, one more nfe).
  """
  allowed = ("solver", "rtol", "atol", "max_steps", "time_grid", "eps", "denoise")
  base.check_options("ode", options, allowed, generic=base.GENERIC_OPTIONS)
  solver_name = options.get("solver", "dopri5")
  base.check_choice("solver", solver_name, SOLVERS)
  solver_cls, adaptive = SOLVERS[solver_name]
  per_step, once = solver_evaluations(solver_cls)
  rtol = check_positive("rtol", options.get("rtol", 1e-5))
  atol = check_positive("atol", options.get("atol", 1e-5))
  max_steps = options.get("max_steps", 4096)
  if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
    raise InputError(f"max_steps must be a positive integer, got {max_steps!r}")
  denoise = base.bool_option(options, "denoise")
  ts = base.sampling_grid(sde, options.get("time_grid", "uniform"), num_steps, options.get("eps"))
  t_end = float(ts[-1])

  def vector_field(t, x, score_fn):
    return sde.probability_flow_drift(score_fn, x, t)

  def run(key, score_fn, x_T, hook=None):
    x, _ = base.initial_state(sde, key, shape, x_T)
    if adaptive:
      controller = diffrax.PIDController(rtol=rtol, atol=atol)
      steps, dt0 = max_steps, -_FIRST_STEP_FRACTION * (sde.T - t_end)
    else:
      controller = diffrax.StepTo(ts=jnp.asarray(ts, x.dtype))
      steps, dt0 = num_steps, None
    solver = solver_cls() if hook is None else HookedSolver(solver_cls(), hook, key, -1.0)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), solver, t0=sde.T, t1=t_end, dt0=dt0, y0=x,
        args=score_fn, stepsize_controller=controller, max_steps=steps,
        saveat=diffrax.SaveAt(t1=True))
    nfe = per_step * sol.stats["num_steps"] + once  # num_steps counts rejected steps too
    return sol.ys[-1], jnp.asarray(nfe, jnp.int32)

  info = dict(solver=solver_name, adaptive=adaptive, rtol=rtol, atol=atol, denoise=denoise,
              ts=None if adaptive else ts, t_end=t_end,
              nfe=None if adaptive else per_step * num_steps + once + int(denoise))
  hook_error = None
  if adaptive:
    fixed = sorted(k for k, v in SOLVERS.items() if not v[1])
    hook_error = (f"the ode sampler's solver {solver_name!r} chooses its own steps, so it cannot "
                  f"apply a per-step hook; use a fixed-step solver, one of {fixed}")
  return base.Sampler("ode", shape, run, info, hook_error)
