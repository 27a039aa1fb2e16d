"""Log-likelihoods, bits/dim and latent codes through the probability-flow ODE (Song et al. 2021,
Sec. 4.3 and App. D.2), each one jit-compiled diffrax solve.

The instantaneous change of variables gives, for the flow dx/dt = f~(x, t) from t = eps to T,
    log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt,          (Eq. 39)
with p_T replaced by the prior. The divergence is exact (D Jacobian-vector products per evaluation,
for small D) or Hutchinson's estimate E_v[v^T (d f~/dx) v] with Rademacher or Gaussian probes
drawn once per solve (Grathwohl et al. 2019).

bits/dim conventions (score_sde's): data in [0, 1] are dequantized as (256 bins) u = (x 255 + U) /
256 and mapped to the model's space by the scaler (identity, or 2u - 1 when centered). Then
    bpd = -log p(model x) / (D ln 2) + offset,  offset = 8 for [0, 1] models, 7 for [-1, 1] models:
8 = log2 256 converts the density of u to the probability of its 8-bit bin, and centering
stretches each dimension by 2, which costs one bit less.

Precision: the ODE runs in float32 and so does the network, whatever config.model.dtype says: a
network score function (sgm_jax.score.get_score_fn) is rebuilt with its network in float32
(`score.with_network_dtype`; same parameters). A bfloat16 network's score is off by rounding
(~20 % relative at t = 1e-3, where x_t's noise is near bfloat16's resolution of x), and the adaptive
solver pays for it: on a trained Fashion-MNIST U-Net, bits/dim 0.014-0.022 lower on average (up to
0.05 per image) with 17-42 % more steps (README "Mixed precision").
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import score as score_lib
from sgm_jax.errors import InputError, check_positive
from sgm_jax.sampling import base
from sgm_jax.sampling.ode import SOLVERS, solver_evaluations
from sgm_jax.sde_lib import SDE

Array = jax.Array
DIVERGENCES = ("rademacher", "gaussian", "exact")
_FIRST_STEP_FRACTION = 0.01


def _per_example_sum(v: Array) -> Array:
  return v.reshape(v.shape[0], -1).sum(-1)


def _exact_divergence(f: Callable, x: Array, t: Array) -> tuple[Array, Array]:
  """f(x, t) and its exact divergence per example, through one jvp per dimension."""
  d = math.prod(x.shape[1:])
  basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
  jvp = lambda e: jax.jvp(lambda y: f(y, t), (x,), (jnp.broadcast_to(e, x.shape),))
  values, tangents = jax.vmap(jvp)(basis)
  trace = jnp.einsum("dbi,di->b", tangents.reshape(d, x.shape[0], d), basis.reshape(d, d))
  return values[0], trace


def _hutchinson_divergence(f: Callable, x: Array, t: Array, probes: Array) -> tuple[Array, Array]:
  """f(x, t) and the mean over probes v of v^T J v per example."""
  def one(v):
    value, jv = jax.jvp(lambda y: f(y, t), (x,), (v,))
    return value, _per_example_sum(v * jv)
  values, estimates = jax.vmap(one)(probes)
  return values[0], estimates.mean(0)


def _solve(vector_field, y0, t0: float, t1: float, solver: str, rtol: float, atol: float,
           max_steps: int, args):
  solver_cls, _ = SOLVERS[solver]
  per_step, once = solver_evaluations(solver_cls)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), solver_cls(), t0=t0, t1=t1,
      dt0=_FIRST_STEP_FRACTION * (t1 - t0), y0=y0, args=args,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
      saveat=diffrax.SaveAt(t1=True))
  y1 = jax.tree_util.tree_map(lambda a: a[-1], sol.ys)
  return y1, jnp.asarray(per_step * sol.stats["num_steps"] + once, jnp.int32)


def _float32_network(score_fn: Callable):
  """score_fn as a jit argument, its network (if it has one with a dtype) computing in float32."""
  return base.as_traceable(score_lib.with_network_dtype(score_fn, jnp.float32))


def _check_solve(sde: SDE, rtol, atol, eps, solver: str) -> tuple[float, float]:
  """(rtol, atol) as floats; an InputError for a bad tolerance, eps or solver."""
  rtol, atol = check_positive("rtol", rtol), check_positive("atol", atol)
  if not 0 < eps < sde.T:
    raise InputError(f"eps must lie in (0, T={sde.T}), got {eps!r}")
  adaptive = sorted(k for k, v in SOLVERS.items() if v[1])
  if solver not in adaptive:
    raise InputError(f"unknown or fixed-step solver {solver!r}; the probability-flow ODE is "
                     f"solved adaptively here, valid solvers are {adaptive}")
  return rtol, atol


def get_likelihood_fn(sde: SDE, divergence: str = "rademacher", num_probes: int = 1,
                      rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5,
                      solver: str = "dopri5", max_steps: int = 4096,
                      prior_logp: Optional[Callable[[Array], Array]] = None) -> Callable:
  """ll_fn(key, score_fn, x) -> (logp (B,), z, nfe): log p_eps(x) in nats, no dequantization.

  z is x carried to t = T; nfe counts evaluations of the ODE's right-hand side (each with one
  score_fn call per probe, or D for the exact divergence). One jit-compiled diffrax solve, with a
  network score function's network in float32 (module docstring).
  `prior_logp(z)` replaces the SDE's prior density at T (e.g. an exact p_T in tests).
  """
  if divergence not in DIVERGENCES:
    raise InputError(f"unknown divergence {divergence!r}; valid values are {list(DIVERGENCES)}")
  if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
    raise InputError(f"num_probes must be a positive integer, got {num_probes!r}")
  rtol, atol = _check_solve(sde, rtol, atol, eps, solver)

  def vector_field(t, y, args):
    score_fn, probes = args
    x, _ = y
    f = lambda v, s: sde.probability_flow_drift(score_fn, v, s)
    if divergence == "exact":
      dx, div = _exact_divergence(f, x, t)
    else:
      dx, div = _hutchinson_divergence(f, x, t, probes)
    return dx, div

  @jax.jit
  def run(key, score_fn, x):
    if divergence == "rademacher":
      probes = jax.random.rademacher(key, (num_probes,) + x.shape, x.dtype)
    elif divergence == "gaussian":
      probes = jax.random.normal(key, (num_probes,) + x.shape, x.dtype)
    else:
      probes = None
    y0 = (x, jnp.zeros((x.shape[0],), x.dtype))
    (z, delta), nfe = _solve(vector_field, y0, eps, sde.T, solver, rtol, atol, max_steps,
                             (score_fn, probes))
    return (sde.prior_logp(z) if prior_logp is None else prior_logp(z)) + delta, z, nfe

  def ll_fn(key, score_fn, x):
    return run(key, _float32_network(score_fn), x)

  return ll_fn


def _flow_fn(sde: SDE, forward: bool, rtol: float, atol: float, eps: float, solver: str,
             max_steps: int) -> Callable:
  rtol, atol = _check_solve(sde, rtol, atol, eps, solver)
  t0, t1 = (eps, sde.T) if forward else (sde.T, eps)

  @jax.jit
  def run(score_fn, x):
    drift = lambda t, y, score_fn: sde.probability_flow_drift(score_fn, y, t)
    return _solve(drift, x, t0, t1, solver, rtol, atol, max_steps, score_fn)

  return lambda score_fn, x: run(_float32_network(score_fn), x)


def get_encode_fn(sde: SDE, rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5,
                  solver: str = "dopri5", max_steps: int = 4096) -> Callable:
  """encode(score_fn, x) -> (z, nfe): data at t = eps carried to the latent at t = T."""
  return _flow_fn(sde, True, rtol, atol, eps, solver, max_steps)


def get_decode_fn(sde: SDE, rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5,
                  solver: str = "dopri5", max_steps: int = 4096) -> Callable:
  """decode(score_fn, z) -> (x, nfe): the inverse of `get_encode_fn` (same ODE, reversed)."""
  return _flow_fn(sde, False, rtol, atol, eps, solver, max_steps)


def bpd_offset(centered: bool) -> float:
  """Bits/dim offset for 8-bit data: 8 for models of [0, 1] data, 7 for [-1, 1] (see module doc)."""
  return 7.0 if centered else 8.0


def dequantize(key: Array, x: Array) -> Array:
  """Uniform dequantization of [0, 1] data holding k / 255: (x 255 + U(0, 1)) / 256."""
  return (x * 255.0 + jax.random.uniform(key, x.shape, x.dtype)) / 256.0


def bits_per_dim(key: Array, ll_fn: Callable, score_fn: Callable, x: Array, centered: bool,
                 uniform_dequantization: bool = True) -> tuple[Array, Array]:
  """(bpd (B,), nfe) of [0, 1] data x (k / 255 values) under the model, score_sde's conventions.

  Without dequantization the data are used as they are (then the number is a density in bits/dim
  plus the offset, comparable with score_sde's numbers for `uniform_dequantization=False`).
  """
  k_deq, k_ll = jax.random.split(key)
  u = dequantize(k_deq, x) if uniform_dequantization else x
  model_x = 2.0 * u - 1.0 if centered else u
  logp, _, nfe = ll_fn(k_ll, score_fn, model_x)
  d = math.prod(x.shape[1:])
  return -logp / (d * math.log(2.0)) + bpd_offset(centered), nfe
