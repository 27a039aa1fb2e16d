"""Score-matching objectives: pure functions of (params, batch, key) built by factories.

- `dsm_loss`: continuous denoising score matching for any SDE (Song et al. 2021, Eq. 7) with
  weighting lambda(t) in {sigma^2, g^2 (likelihood weighting), any function of t}, or 'output' (the
  plain MSE of the network's own output under its parameterization, see score.output_loss_weight;
  for 'v' / 'edm' networks a unit-variance target at every noise level), and importance
  sampling of t for the likelihood weighting (Song et al. 2021b, "Maximum likelihood training of
  score-based diffusion models").
- `smld_loss` / `ddpm_loss`: the discrete losses of NCSN (VE) and DDPM (VP) on integer steps.
- `ssm_loss`: sliced score matching (Song et al. 2019) with Rademacher or Gaussian projections
  through one jvp, on perturbed data.
- `get_loss_fn(sde, model, ...)`: the training loss of a network, `loss_fn(params, x, key)`.

Losses are averaged over the batch; per example they are summed over dimensions and halved
(score_sde's default) or averaged over dimensions with `reduce_mean=True`.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax import score as score_lib
from sgm_jax.errors import InputError
from sgm_jax.sde_lib import SDE, VESDE, VPSDE, batch_expand

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
Weighting = Union[str, Callable[[Array], Array]]

WEIGHTINGS = ("sigma2", "g2", "output")
LOSS_KINDS = ("dsm", "smld", "ddpm", "ssm")
PROJECTIONS = ("rademacher", "gaussian")


def _reduce(v: Array, reduce_mean: bool) -> Array:
  """Per-example reduction over all but the batch axis."""
  v = v.reshape(v.shape[0], -1)
  return jnp.mean(v, axis=-1) if reduce_mean else 0.5 * jnp.sum(v, axis=-1)


def _check_weighting(weighting: Weighting) -> None:
  if not (callable(weighting) or weighting in WEIGHTINGS):
    raise InputError(f"unknown weighting {weighting!r}; valid values are {list(WEIGHTINGS)} "
                     "or a function of t")


TIME_SAMPLINGS = ("uniform", "log_normal")
EDM_LOG_NORMAL = (-1.2, 1.2)  # EDM's P_mean, P_std of ln(sigma / alpha) (Karras et al. 2022, Table 1)


def _check_time_sampling(time_sampling: str) -> None:
  if time_sampling not in TIME_SAMPLINGS:
    raise InputError(f"unknown time_sampling {time_sampling!r}; valid values are "
                     f"{list(TIME_SAMPLINGS)}")


def sample_times(sde: SDE, key: Array, batch: int, eps: float,
                 importance_sampling: bool = False, time_sampling: str = "uniform",
                 log_normal: tuple[float, float] = EDM_LOG_NORMAL) -> Array:
  """t ~ U(eps, T), or with density proportional to g^2 / sigma^2 when importance sampling, or
  with time_sampling 'log_normal' EDM's ln(rho) ~ N(P_mean, P_std^2), rho = sigma / alpha, clipped
  to [eps, T] (training concentrates on the noise levels where samples take shape).

  For every SDE here g(t)^2 / sigma(t)^2 = -d lambda / dt (lambda the log-SNR), so the importance
  distribution is uniform in log-SNR: t = t(lambda), lambda ~ U(lambda(T), lambda(eps)).
  """
  _check_time_sampling(time_sampling)
  if time_sampling == "log_normal":
    if importance_sampling:
      raise InputError("importance_sampling draws t uniformly in log-SNR; it cannot be combined "
                       "with time_sampling 'log_normal'")
    p_mean, p_std = log_normal
    log_rho = p_mean + p_std * jax.random.normal(key, (batch,))
    return jnp.clip(sde.t_from_rho(jnp.exp(log_rho)), eps, sde.T)
  u = jax.random.uniform(key, (batch,), minval=0.0, maxval=1.0)
  if not importance_sampling:
    return eps + u * (sde.T - eps)
  lam_hi, lam_lo = sde.log_snr(jnp.asarray(eps)), sde.log_snr(jnp.asarray(sde.T))
  return sde.t_from_log_snr(lam_lo + u * (lam_hi - lam_lo))


def dsm_loss(score_fn: ScoreFn, sde: SDE, x: Array, key: Array, weighting: Weighting = "sigma2",
             reduce_mean: bool = False, eps: float = 1e-5,
             importance_sampling: bool = False, t: Optional[Array] = None,
             output_weight: Optional[Callable[[Array], Array]] = None,
             time_sampling: str = "uniform") -> Array:
  """Continuous DSM: E_t lambda(t) E ||s(x_t, t) + z / sigma(t)||^2 with x_t = alpha x_0 + sigma z.

  With weighting 'output', `output_weight(t)` multiplies the eps-MSE ||sigma s + z||^2 (the
  weight that makes it the MSE of the network's output, `score.output_loss_weight`).

  With weighting 'g2' and importance sampling the estimator is Z ||sigma s + z||^2 with
  Z = lambda(eps) - lambda(T), an unbiased, lower-variance estimate of the same objective.
  Given `t` (B,), the loss is evaluated at those times instead of sampled ones; otherwise they
  are drawn by `sample_times` ('uniform' or 'log_normal').
  """
  _check_weighting(weighting)
  if (weighting == "output") != (output_weight is not None):
    raise InputError("weighting 'output' needs output_weight(t), and output_weight needs weighting "
                     f"'output' (got weighting {weighting!r})")
  if importance_sampling and weighting != "g2":
    raise InputError("importance_sampling is defined for the likelihood weighting 'g2' only, "
                     f"got weighting {weighting!r}")
  k_t, k_z = jax.random.split(key)
  if t is None:
    t = sample_times(sde, k_t, x.shape[0], eps, importance_sampling, time_sampling)
  elif importance_sampling:
    raise InputError("importance_sampling draws its own times; do not pass t with it")
  z = jax.random.normal(k_z, x.shape, x.dtype)
  mean, std = sde.marginal_prob(x, t)
  x_t = mean + batch_expand(std, x) * z
  s = score_fn(x_t, t)
  if weighting == "sigma2":
    return jnp.mean(_reduce((s * batch_expand(std, s) + z) ** 2, reduce_mean))
  if weighting == "output":
    return jnp.mean(output_weight(t) * _reduce((s * batch_expand(std, s) + z) ** 2, reduce_mean))
  if importance_sampling:
    normalizer = sde.log_snr(jnp.asarray(eps)) - sde.log_snr(jnp.asarray(sde.T))
    return normalizer * jnp.mean(_reduce((s * batch_expand(std, s) + z) ** 2, reduce_mean))
  if weighting == "g2":
    lam = sde.sde(x, t)[1] ** 2
  else:
    lam = weighting(t)
  return jnp.mean(lam * _reduce((s + z / batch_expand(std, z)) ** 2, reduce_mean))


def smld_loss(model_fn: Callable[[Array, Array], Array], sde: VESDE, x: Array, key: Array,
              reduce_mean: bool = False) -> Array:
  """NCSN's loss on its N noise levels, sigma-squared weighted (Song & Ermon 2019, Eq. 2).

  `model_fn(x, labels)` is the network's score for integer labels that index the noise levels
  from sigma_max (label 0) down, as the discrete VE time labels do.
  """
  k_l, k_z = jax.random.split(key)
  labels = jax.random.randint(k_l, (x.shape[0],), 0, sde.N)
  sigmas = jnp.flip(sde.discrete_sigmas)[labels]
  z = jax.random.normal(k_z, x.shape, x.dtype)
  s = model_fn(x + batch_expand(sigmas, x) * z, labels)
  return jnp.mean(_reduce((s * batch_expand(sigmas, s) + z) ** 2, reduce_mean))


def ddpm_loss(model_fn: Callable[[Array, Array], Array], sde: VPSDE, x: Array, key: Array,
              reduce_mean: bool = False) -> Array:
  """DDPM's simple loss ||eps_theta(x_i, i) - z||^2 on uniform integer steps (Ho et al. 2020)."""
  k_l, k_z = jax.random.split(key)
  labels = jax.random.randint(k_l, (x.shape[0],), 0, sde.N)
  abar = sde.alphas_cumprod[labels]
  z = jax.random.normal(k_z, x.shape, x.dtype)
  x_i = batch_expand(jnp.sqrt(abar), x) * x + batch_expand(jnp.sqrt(1.0 - abar), x) * z
  return jnp.mean(_reduce((model_fn(x_i, labels.astype(x.dtype)) - z) ** 2, reduce_mean))


def ssm_loss(score_fn: ScoreFn, sde: SDE, x: Array, key: Array, projection: str = "rademacher",
             num_projections: int = 1, variance_reduction: bool = True,
             weighting: Weighting = "sigma2", eps: float = 1e-5,
             t: Optional[Array] = None) -> Array:
  """Sliced score matching on p_t: E_t lambda(t) E_v [v^T J_s v + ||s||^2 / 2] (SSM-VR).

  Without variance reduction the second term is (v^T s)^2 / 2. v is Rademacher or standard normal
  (both have E[v v^T] = I); J_s v comes from one jvp per projection. Given `t` (B,), the loss is
  evaluated at those times.
  """
  if projection not in PROJECTIONS:
    raise InputError(f"unknown projection {projection!r}; valid values are {list(PROJECTIONS)}")
  if num_projections < 1:
    raise InputError(f"num_projections must be >= 1, got {num_projections}")
  _check_weighting(weighting)
  if weighting == "output":
    raise InputError("weighting 'output' is defined for the DSM loss only; sliced score matching "
                     "takes 'sigma2', 'g2' or a function of t")
  k_t, k_z, k_v = jax.random.split(key, 3)
  if t is None:
    t = sample_times(sde, k_t, x.shape[0], eps)
  mean, std = sde.marginal_prob(x, t)
  x_t = mean + batch_expand(std, x) * jax.random.normal(k_z, x.shape, x.dtype)

  def one_projection(k):
    if projection == "rademacher":
      v = jax.random.rademacher(k, x.shape, x.dtype)
    else:
      v = jax.random.normal(k, x.shape, x.dtype)
    s, jv = jax.jvp(lambda y: score_fn(y, t), (x_t,), (v,))
    trace_term = (v * jv).reshape(x.shape[0], -1).sum(-1)
    if variance_reduction:
      norm_term = 0.5 * (s ** 2).reshape(x.shape[0], -1).sum(-1)
    else:
      norm_term = 0.5 * (v * s).reshape(x.shape[0], -1).sum(-1) ** 2
    return trace_term + norm_term

  per_example = jnp.mean(jax.vmap(one_projection)(jax.random.split(k_v, num_projections)), 0)
  if weighting == "sigma2":
    lam = std ** 2
  elif weighting == "g2":
    lam = sde.sde(x, t)[1] ** 2
  else:
    lam = weighting(t)
  return jnp.mean(lam * per_example)


def get_loss_fn(sde: SDE, model: nn.Module, kind: str = "dsm", continuous: bool = True,
                train: bool = True, reduce_mean: bool = False, weighting: Weighting = "sigma2",
                eps: float = 1e-5, importance_sampling: bool = False,
                projection: str = "rademacher", num_projections: int = 1,
                parameterization: Optional[str] = None, sigma_data: float = 0.5,
                time_sampling: str = "uniform") -> Callable:
  """loss_fn(params, x, key) -> scalar loss of `model` trained under `sde`.

  kind 'dsm' (continuous time, any SDE), 'smld' (discrete, VE only), 'ddpm' (discrete, VP only)
  or 'ssm' (sliced score matching on perturbed data, any SDE). The key also drives dropout.
  `parameterization` / `sigma_data`: what the network outputs (score.get_score_fn); weighting
  'output' (DSM only) makes the loss the MSE of that output. `time_sampling` 'uniform' or
  'log_normal' (DSM only, `sample_times`).
  """
  if kind not in LOSS_KINDS:
    raise InputError(f"unknown loss {kind!r}; valid losses are {list(LOSS_KINDS)}")
  if kind == "smld" and type(sde) is not VESDE:
    raise InputError(f"the discrete SMLD loss is defined for VESDE only, got {type(sde).__name__}; "
                     "use kind='dsm' (continuous) for other SDEs")
  if kind == "ddpm" and type(sde) is not VPSDE:
    raise InputError(f"the discrete DDPM loss is defined for VPSDE only, got {type(sde).__name__}; "
                     "use kind='dsm' (continuous) for other SDEs")
  _check_weighting(weighting)
  kind_out = score_lib.check_parameterization(sde, parameterization, sigma_data, continuous)
  if kind_out != sde.network_output and kind not in ("dsm", "ssm"):
    raise InputError(f"parameterization {kind_out!r} is trained with the continuous losses "
                     f"['dsm', 'ssm'], not {kind!r}")
  _check_time_sampling(time_sampling)
  if time_sampling != "uniform" and kind != "dsm":
    raise InputError(f"time_sampling {time_sampling!r} is defined for the DSM loss only, not "
                     f"{kind!r}")
  output_weight = None
  if weighting == "output":
    if kind != "dsm":
      raise InputError(f"weighting 'output' is defined for the DSM loss only, not {kind!r}")
    output_weight = lambda t: score_lib.output_loss_weight(sde, kind_out, sigma_data, t)

  def loss_fn(params, x: Array, key: Array) -> Array:
    k_loss, k_dropout = jax.random.split(key)
    variables = {"params": params}
    if kind in ("smld", "ddpm"):
      apply = score_lib.get_model_fn(model, variables, train=train)
      model_fn = lambda x_i, labels: apply(x_i, labels, k_dropout)
      if kind == "smld":
        return smld_loss(model_fn, sde, x, k_loss, reduce_mean)
      return ddpm_loss(model_fn, sde, x, k_loss, reduce_mean)
    net_score = score_lib.get_score_fn(sde, model, variables, continuous=continuous, train=train,
                                       parameterization=parameterization, sigma_data=sigma_data)
    score_fn = lambda x_t, t: net_score(x_t, t, k_dropout)
    if kind == "dsm":
      return dsm_loss(score_fn, sde, x, k_loss, weighting, reduce_mean, eps, importance_sampling,
                      output_weight=output_weight, time_sampling=time_sampling)
    return ssm_loss(score_fn, sde, x, k_loss, projection, num_projections, True, weighting, eps)

  return loss_fn
