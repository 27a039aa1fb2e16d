"""The one boundary between networks and their users: network output -> score, eps or x0.

Samplers, losses and likelihoods see `score_fn(x, t[, rng]) -> score` only. How a network is
conditioned on time and what it outputs is a property of the SDE it was trained with, read here
through SDE methods (score_sde conventions):

- `sde.time_label(t, continuous)`: the network's conditioning input (VE: sigma(t) or the integer
  index round((T - t)(N - 1)) of its noise level; VP: 999 t or t (N - 1); sub-VP: 999 t).
- `sde.network_output`: 'score' (VE and the tutorial SDE: the output is the score; NCSN++ with
  scale_by_sigma divides by sigma inside the network) or 'eps' (VP / sub-VP: the output predicts
  the noise z of x_t = alpha x_0 + sigma z, and score = -eps / `sde.network_std(t, continuous)`,
  which for discrete VP is sqrt(1 - alphas_cumprod[int(t (N - 1))])). This is the original
  checkpoints' convention and the default.
- a `parameterization` chosen for a newly trained network overrides it (continuous time only):
  'x0' (the output predicts x_0), 'v' (Salimans & Ho 2022: v = alpha z - sigma x_0) or 'edm'
  (Karras et al. 2022, Eq. 7: input scaled by c_in, x_0 = c_skip x_t / alpha + c_out F with the
  data std `sigma_data`). How an output error reaches x_0 decides whether few-step ODE samplers
  can use a network: an eps error is multiplied by sigma / alpha (150 at the end of the VP SDE),
  while v and edm outputs become x_0 with factors at most 1 and eps -> x_t at high noise without
  the network learning it. `output_loss_weight` turns the eps-MSE into the MSE of each output.
- `score_fn_from_model` does the same for any network given as apply_fn(x, timestep) (one
  trained elsewhere, e.g. a diffusers model on a `discrete_schedule.DiscreteVPSchedule`), with
  diffusers' prediction types 'epsilon', 'sample' and 'v_prediction' as aliases.

Precision: a network may compute in bfloat16 (config.model.dtype); its output is cast back here to
the dtype of x, at least float32 (`_ModelApply`, `_ApplyFnScore`), so the loss, samplers and
likelihood only ever see float32. `with_network_dtype` rebuilds a score function with its network
computing in another dtype (sgm_jax.likelihood uses float32).

Every function returned here is a `jax.tree_util.Partial` whose arguments (the network variables,
or an inner score function) are pytree leaves: a jitted sampler that takes it as an argument
traces the variables instead of baking them in as constants, so new parameters reuse the
compiled program. The callable inside is a frozen dataclass compared by value, so rebuilding a
score function for the same SDE and model also reuses it.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.errors import InputError
from sgm_jax.sde_lib import SDE, batch_expand, batch_times

Array = jax.Array
Partial = jax.tree_util.Partial

NETWORK_OUTPUTS = ("score", "eps")
PARAMETERIZATIONS = ("score", "eps", "x0", "v", "edm")


# --- calling a network ----------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _takes_train_flag(module_type: type) -> bool:
  try:
    params = inspect.signature(module_type.__call__).parameters
  except (TypeError, ValueError):
    return False
  return "train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def output_dtype(x: Array) -> Any:
  """What a network output is cast back to: the dtype of x, at least float32."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def train_kwargs(model: nn.Module, train: bool) -> dict:
  """{'train': train} when the model's __call__ takes a `train` flag, else {}."""
  return {"train": train} if _takes_train_flag(type(model)) else {}


def check_variables(variables: Any) -> None:
  """Raise a ValueError unless `variables` is a Flax variables mapping with 'params'."""
  if not isinstance(variables, Mapping) or "params" not in variables:
    found = sorted(map(str, variables))[:8] if isinstance(variables, Mapping) else type(variables)
    raise InputError("variables must be a mapping with a 'params' collection, as returned by "
                     "model.init (wrap a bare parameter tree as {'params': params}); "
                     f"got {found}")


@dataclasses.dataclass(frozen=True)
class _ModelApply:
  """model.apply(variables, x, labels) in eval or train mode (dropout key from `rng`), the output
  cast back from the network's dtype (`output_dtype`)."""

  model: nn.Module
  train: bool = False

  def __call__(self, variables, x: Array, labels: Array, rng: Optional[Array] = None) -> Array:
    rngs = {"dropout": rng} if (self.train and rng is not None) else None
    out = self.model.apply(variables, x, labels, rngs=rngs, **train_kwargs(self.model, self.train))
    return out.astype(output_dtype(x))


def get_model_fn(model: nn.Module, variables: Mapping, train: bool = False) -> Partial:
  """model_fn(x, labels, rng=None) -> raw network output, with `variables` as traced arguments.

  In train mode `rng` is the dropout key. Collections other than 'params' are read only (the
  score_sde networks have none).
  """
  check_variables(variables)
  return Partial(_ModelApply(model, bool(train)), variables)


# --- network output -> score ----------------------------------------------------------------
def _kernel(sde: SDE, t: Array, like: Array) -> tuple[Array, Array]:
  return batch_expand(sde.alpha(t), like), batch_expand(sde.sigma(t), like)


def _edm_std(alpha: Array, sigma: Array, sigma_data: float) -> Array:
  """S = sqrt(sigma^2 + alpha^2 sigma_data^2): the std of x_t for data of std sigma_data."""
  return jnp.sqrt(sigma ** 2 + (alpha * sigma_data) ** 2)


def network_input(sde: SDE, parameterization: str, sigma_data: float, x: Array,
                  t: Array) -> Array:
  """What the network sees: x_t, or x_t / S (EDM's c_in, unit variance) for 'edm'."""
  if parameterization != "edm":
    return x
  alpha, sigma = _kernel(sde, t, x)
  return x / _edm_std(alpha, sigma, sigma_data)


def score_from_output(sde: SDE, parameterization: str, sigma_data: float, out: Array, x: Array,
                      t: Array, continuous: bool = True) -> Array:
  """grad log p_t(x) from a network output F under `parameterization` (x_t = alpha x_0 + sigma z).

  eps: -F / sigma. x0: (alpha F - x) / sigma^2. v: x_0 = (alpha x - sigma F) / (alpha^2 + sigma^2),
  so score = -(x + alpha F / sigma) / (alpha^2 + sigma^2). edm (Karras et al. 2022, Eq. 7 in
  x / alpha with noise level sigma / alpha): score = -x / S^2 + alpha sigma_data F / (sigma S),
  written without the cancellation of c_skip - 1 near t = 0.
  """
  if parameterization == "score":
    return out
  if parameterization == "eps":
    return -out / batch_expand(sde.network_std(t, continuous), out)
  alpha, sigma = _kernel(sde, t, x)
  if parameterization == "x0":
    return (alpha * out - x) / sigma ** 2
  if parameterization == "v":
    return -(x + alpha * out / sigma) / (alpha ** 2 + sigma ** 2)
  if parameterization == "edm":
    S = _edm_std(alpha, sigma, sigma_data)
    return -x / S ** 2 + alpha * sigma_data * out / (sigma * S)
  raise InputError(f"unknown parameterization {parameterization!r}; valid values are "
                   f"{list(PARAMETERIZATIONS)}")


def output_loss_weight(sde: SDE, parameterization: str, sigma_data: float, t: Array) -> Array:
  """w(t) with ||F - F*||^2 = w(t) ||eps_hat - z||^2: the eps-MSE weight that makes denoising
  score matching the plain MSE of the network's own output (unit-variance target for 'v'/'edm')."""
  alpha, sigma = sde.alpha(t), sde.sigma(t)
  if parameterization == "eps":
    return jnp.ones_like(sigma)
  if parameterization == "score":
    return 1.0 / sigma ** 2
  if parameterization == "x0":
    return (sigma / alpha) ** 2
  if parameterization == "v":
    return ((alpha ** 2 + sigma ** 2) / alpha) ** 2
  if parameterization == "edm":
    return _edm_std(alpha, sigma, sigma_data) ** 2 / (alpha * sigma_data) ** 2
  raise InputError(f"unknown parameterization {parameterization!r}; valid values are "
                   f"{list(PARAMETERIZATIONS)}")


def check_parameterization(sde: SDE, parameterization: Optional[str], sigma_data: float = 0.5,
                           continuous: bool = True) -> str:
  """The effective parameterization (None: the SDE's `network_output`), validated."""
  if parameterization is None:
    _check_network_output(sde)
    return sde.network_output
  if parameterization not in PARAMETERIZATIONS:
    raise InputError(f"unknown parameterization {parameterization!r} (config.model."
                     f"parameterization); valid values are {list(PARAMETERIZATIONS)} or None for "
                     f"the SDE's own ({sde.network_output!r})")
  if parameterization != sde.network_output and not continuous:
    raise InputError(f"parameterization {parameterization!r} needs continuous-time training "
                     "(training.continuous=True); discrete models keep the SDE's "
                     f"{sde.network_output!r} output")
  if parameterization == "edm" and not (isinstance(sigma_data, (int, float)) and sigma_data > 0):
    raise InputError(f"sigma_data must be a positive float, got {sigma_data!r}")
  return parameterization


@dataclasses.dataclass(frozen=True)
class _NetworkScore:
  """Score of a network trained under `sde` (see the module docstring for the conventions)."""

  sde: SDE
  model: nn.Module
  continuous: bool
  train: bool = False
  parameterization: str = "eps"
  sigma_data: float = 0.5

  def __call__(self, variables, x: Array, t: Array, rng: Optional[Array] = None) -> Array:
    t = batch_times(t, x)
    labels = self.sde.time_label(t, self.continuous)
    inputs = network_input(self.sde, self.parameterization, self.sigma_data, x, t)
    out = _ModelApply(self.model, self.train)(variables, inputs, labels, rng)
    return score_from_output(self.sde, self.parameterization, self.sigma_data, out, x, t,
                             self.continuous)


def with_network_dtype(fn: Callable, dtype: Any) -> Callable:
  """`fn` with its network computing in `dtype`: a score or model function of this module (also
  one inside a Partial that wraps it, as get_eps_fn's) whose flax module has a `dtype` field is
  rebuilt with `model.clone(dtype=dtype)`, same variables; any other function is returned as is."""
  if not isinstance(fn, Partial):
    return fn
  func = fn.func
  if isinstance(func, (_NetworkScore, _ModelApply)) and hasattr(func.model, "dtype"):
    func = dataclasses.replace(func, model=func.model.clone(dtype=dtype))
  args = [with_network_dtype(a, dtype) for a in fn.args]
  keywords = {k: with_network_dtype(v, dtype) for k, v in fn.keywords.items()}
  return Partial(func, *args, **keywords)


def _check_network_output(sde: SDE) -> None:
  if sde.network_output not in NETWORK_OUTPUTS:
    raise InputError(f"{type(sde).__name__}.network_output is {sde.network_output!r}; "
                     f"valid values are {list(NETWORK_OUTPUTS)}")


def get_score_fn(sde: SDE, model: nn.Module, variables: Mapping, continuous: bool,
                 train: bool = False, parameterization: Optional[str] = None,
                 sigma_data: float = 0.5) -> Partial:
  """score_fn(x, t, rng=None) -> grad_x log p_t(x) of a network trained under `sde`.

  `continuous` says whether the network was trained on continuous time labels (score_sde's
  `training.continuous`); `parameterization` (default: the SDE's `network_output`) says what the
  network outputs, `sigma_data` is EDM's data std. The result is a Partial carrying `variables`
  as traced arguments.
  """
  check_variables(variables)
  kind = check_parameterization(sde, parameterization, sigma_data, continuous)
  return Partial(_NetworkScore(sde, model, bool(continuous), bool(train), kind,
                               float(sigma_data)), variables)


# diffusers' prediction_type names -> the parameterizations above.
PREDICTION_ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


@dataclasses.dataclass(frozen=True)
class _ApplyFnScore:
  """Score of apply_fn(x, sde.time_label(t), *args), which outputs `parameterization`."""

  sde: SDE
  parameterization: str
  sigma_data: float = 0.5

  def __call__(self, apply_fn: Callable, x: Array, t: Array, *args) -> Array:
    t = batch_times(t, x)
    inputs = network_input(self.sde, self.parameterization, self.sigma_data, x, t)
    out = apply_fn(inputs, self.sde.time_label(t), *args).astype(output_dtype(x))
    return score_from_output(self.sde, self.parameterization, self.sigma_data, out, x, t)


def score_fn_from_model(sde: SDE, apply_fn: Callable, prediction: str = "epsilon",
                        sigma_data: float = 0.5) -> Partial:
  """score_fn(x, t, *args) of any network given as apply_fn(x, timestep, *args) -> output.

  `timestep` is `sde.time_label(t)` (for `discrete_schedule.DiscreteVPSchedule`: the training
  step t N - 1; for VPSDE: 999 t), `prediction` what the network outputs: diffusers' 'epsilon',
  'sample' (x_0) or 'v_prediction' (v = alpha z - sigma x_0), or 'eps', 'x0', 'v', 'score', 'edm'
  (see `score_from_output`). Pass apply_fn as `jax.tree_util.Partial(fn, params)` to keep the
  parameters traced arguments of a jitted sampler.
  """
  kind = PREDICTION_ALIASES.get(prediction, prediction) if isinstance(prediction, str) else None
  if kind not in PARAMETERIZATIONS:
    raise InputError(f"unknown prediction type {prediction!r}; valid values are "
                     f"{list(PREDICTION_ALIASES) + list(PARAMETERIZATIONS)}")
  kind = check_parameterization(sde, kind, sigma_data)
  if not callable(apply_fn):
    raise InputError(f"apply_fn must be callable as apply_fn(x, timestep), got "
                     f"{type(apply_fn).__name__}")
  return Partial(_ApplyFnScore(sde, kind, float(sigma_data)), as_partial(apply_fn))


# --- score -> eps / x0 ----------------------------------------------------------------------
def eps_from_score(sde: SDE, score: Array, t: Array) -> Array:
  """Noise prediction E[z | x_t] = -sigma(t) score."""
  return -batch_expand(sde.sigma(t), score) * score


def score_from_eps(sde: SDE, eps: Array, t: Array) -> Array:
  """Inverse of `eps_from_score`: score = -eps / sigma(t)."""
  return -eps / batch_expand(sde.sigma(t), eps)


def denoised_from_score(sde: SDE, x: Array, score: Array, t: Array) -> Array:
  """Tweedie's formula E[x_0 | x_t] = (x + sigma(t)^2 score) / alpha(t)."""
  sigma = batch_expand(sde.sigma(t), x)
  return (x + sigma ** 2 * score) / batch_expand(sde.alpha(t), x)


def as_partial(fn: Callable) -> Partial:
  """`fn` as a Partial (unchanged if it is one), so it can be a pytree argument of jit."""
  if isinstance(fn, Partial):
    return fn
  if not callable(fn):
    raise InputError(f"expected a callable score_fn(x, t), got {type(fn).__name__}")
  return Partial(fn)


@dataclasses.dataclass(frozen=True)
class _EpsFromScore:
  sde: SDE

  def __call__(self, score_fn: Callable, x: Array, t: Array, *args) -> Array:
    t = batch_times(t, x)
    return eps_from_score(self.sde, score_fn(x, t, *args), t)


@dataclasses.dataclass(frozen=True)
class _DenoiserFromScore:
  sde: SDE

  def __call__(self, score_fn: Callable, x: Array, t: Array, *args) -> Array:
    t = batch_times(t, x)
    return denoised_from_score(self.sde, x, score_fn(x, t, *args), t)


def get_eps_fn(sde: SDE, score_fn: Callable) -> Partial:
  """eps_fn(x, t, ...) = -sigma(t) score_fn(x, t, ...): the noise prediction of any score.

  sigma is the SDE's kernel std (for a network trained with a discrete VP objective this differs
  from its training std by O(1/N), so eps_fn is the eps consistent with the score, which is what
  exponential integrators built on alpha(t), sigma(t) need).
  """
  return Partial(_EpsFromScore(sde), as_partial(score_fn))


def get_denoiser_fn(sde: SDE, score_fn: Callable) -> Partial:
  """denoiser_fn(x, t, ...) = (x + sigma^2 score) / alpha: the posterior mean of x_0 (Tweedie)."""
  return Partial(_DenoiserFromScore(sde), as_partial(score_fn))
