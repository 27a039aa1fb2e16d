"""Explicit time grids (an array as `time_grid`) and grids tuned to a score function
(sgm_jax.sampling.tuning)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import sde_lib, toy
from sgm_jax.errors import InputError
from sgm_jax.sampling import get_sampler, schedules, tuning

pytestmark = pytest.mark.usefixtures("fast_compiles")

VP = sde_lib.VPSDE()
# a 2-D mixture whose flow bends where samples pick a mode: the grid matters at 4 steps
GM = toy.GaussianMixture.create(jnp.array([[-0.8, 0.6], [0.7, 0.5], [0.1, -0.9], [0.9, -0.6]]),
                                0.2)
SHAPE = (64, 2)


def score_fn(x, t):
  return GM.score(x, VP, t)


FIXED_GRID_SAMPLERS = [("deis", {}), ("ipndm", {}), ("unipc", {}), ("dpm_solver", {"order": 3}),
                       ("ddim", {}), ("heun", {})]


@pytest.mark.parametrize("name,options", FIXED_GRID_SAMPLERS, ids=[n for n, _ in FIXED_GRID_SAMPLERS])
def test_an_explicit_grid_runs_exactly_like_the_named_grid_it_equals(name, options):
  named = get_sampler(name, VP, SHAPE, 6, time_grid="log_rho", **options)
  ts = schedules.get_time_grid("log_rho", VP, 6, VP.default_sampling_eps)
  explicit = get_sampler(name, VP, SHAPE, 6, time_grid=ts, **options)
  key = jax.random.PRNGKey(3)
  a, nfe_a = named(key, score_fn)
  b, nfe_b = explicit(key, score_fn)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(nfe_a) == int(nfe_b)
  moved = ts.copy()
  moved[2] = 0.5 * (ts[1] + ts[2])
  other = get_sampler(name, VP, SHAPE, 6, time_grid=moved, **options)
  assert not np.allclose(np.asarray(other(key, score_fn)[0]), np.asarray(a))


def test_explicit_grid_is_recorded_and_fixes_eps():
  ts = schedules.polynomial_t(VP, 4, 2e-3)
  sampler = get_sampler("unipc", VP, SHAPE, 4, time_grid=ts)
  assert sampler.info["time_grid"] == "explicit"
  np.testing.assert_array_equal(sampler.info["ts"], ts)
  assert get_sampler("deis", VP, SHAPE, 4, time_grid=ts).info["eps"] == 2e-3
  get_sampler("deis", VP, SHAPE, 4, time_grid=ts, eps=2e-3)  # agreeing eps is fine


@pytest.mark.parametrize("grid,options,match", [
    (np.linspace(1.0, 1e-3, 4), {}, "hold 5 times"),
    (np.array([1.0, 0.5, 0.6, 0.1, 1e-3]), {}, "strictly decreasing"),
    (np.array([0.9, 0.5, 0.3, 0.1, 1e-3]), {}, "from T=1"),
    (np.array([1.0, 0.5, 0.3, 0.1, 0.0]), {}, "eps in"),
    (np.array([1.0, 0.5, np.nan, 0.1, 1e-3]), {}, "finite"),
    (np.linspace(1.0, 1e-3, 5), {"eps": 1e-2}, "contradicts"),
])
@pytest.mark.parametrize("name", ["deis", "unipc", "ddim"])
def test_bad_explicit_grids_are_refused_naming_the_problem(name, grid, options, match):
  with pytest.raises(InputError, match=match):
    get_sampler(name, VP, SHAPE, 4, time_grid=grid, **options)


def test_grid_order_is_refused_with_an_explicit_grid():
  with pytest.raises(InputError, match="grid_order"):
    get_sampler("deis", VP, SHAPE, 4, time_grid=np.linspace(1.0, 1e-3, 5), grid_order=3.0)


def test_logits_parametrize_every_grid_and_only_valid_ones():
  ts = schedules.log_rho(VP, 7, 1e-3)
  np.testing.assert_allclose(tuning.grid_from_logits(tuning.logits_from_grid(ts), 1.0, 1e-3), ts,
                             rtol=1e-12)
  z = np.random.RandomState(0).randn(7) * 5
  g = tuning.grid_from_logits(z, 1.0, 1e-3)
  assert g[0] == 1.0 and g[-1] == 1e-3 and np.all(np.diff(g) < 0)


def _fresh_error(grid, name="unipc", options=None, seed=11):
  """RMS error of `name` on a fresh batch (not the warm-up draws) against the exact flow."""
  from tests.oracle_flow import exact_flow_map
  x_T = VP.prior_sampling(jax.random.PRNGKey(seed), (256, 2))
  with jax.enable_x64(True):
    ref = exact_flow_map(GM, VP, np.asarray(x_T), 1.0, VP.default_sampling_eps, tol=1e-10)
  sampler = get_sampler(name, VP, (256, 2), 4, **({} if grid is None else {"time_grid": grid}),
                        **(options or {}))
  return tuning.rms_error(sampler(jax.random.PRNGKey(0), score_fn, x_T=x_T)[0], ref)


@pytest.fixture(scope="module")
def tuned_unipc():
  # Every candidate compiles a sampler: 20 of them leave the fresh draws' error at 0.69 of the
  # default grid's (40: 0.64) in half the time.
  return tuning.tune_time_grid("unipc", VP, score_fn, SHAPE, 4, key=jax.random.PRNGKey(1),
                               num_warmup=256, max_evals=20)


def test_a_tuned_grid_beats_the_default_on_draws_it_was_not_tuned_on(tuned_unipc):
  assert tuned_unipc.shape == (5,) and tuned_unipc[0] == 1.0
  assert tuned_unipc[-1] == VP.default_sampling_eps and np.all(np.diff(tuned_unipc) < 0)
  default, tuned = _fresh_error(None), _fresh_error(tuned_unipc)
  assert tuned < 0.8 * default, (tuned, default)


def test_tuning_keeps_the_sampler_options_and_eps():
  grid = tuning.tune_time_grid("deis", VP, score_fn, SHAPE, 3, key=jax.random.PRNGKey(1),
                               num_warmup=32, max_evals=8, order=1, eps=1e-2)
  assert grid[-1] == 1e-2
  get_sampler("deis", VP, SHAPE, 3, time_grid=grid, order=1)


STUDENT_OPTIONS = [dict(score_scale=1.5), dict(thresholding="clip", data_range=(-0.4, 0.4)),
                   dict(denoise=True, eps=0.05)]


@pytest.mark.parametrize("options", STUDENT_OPTIONS, ids=["score_scale", "thresholding", "denoise"])
def test_the_teacher_has_the_students_score_scale_thresholding_and_final_jump(tmp_path, options):
  """A fine DEIS grid (160 steps) is nearly the teacher's solve when the teacher runs the same
  program around the ODE; against the plain probability-flow ODE its end points are far off."""
  path, steps = str(tmp_path / "grids.json"), 160
  tuning.tune_time_grid("deis", VP, score_fn, SHAPE, steps, key=jax.random.PRNGKey(1),
                        num_warmup=32, max_evals=1, cache=path, model_id="oracle", **options)
  (stored,) = json.load(open(path)).values()
  x_T = VP.prior_sampling(jax.random.split(jax.random.PRNGKey(1))[0], (32, 2))
  student = get_sampler("deis", VP, (32, 2), steps, **options)(jax.random.PRNGKey(0), score_fn,
                                                                x_T=x_T)[0]
  plain = get_sampler("ode", VP, (32, 2), 1, eps=options.get("eps", VP.default_sampling_eps),
                      **tuning.TEACHER_OPTIONS)(jax.random.PRNGKey(0), score_fn, x_T=x_T)[0]
  assert stored["warmup_error"] < 5e-3, stored
  assert tuning.rms_error(student, plain) > 20 * stored["warmup_error"]


def test_cache_returns_the_stored_grid_without_running_the_model(tmp_path, tuned_unipc):
  path = str(tmp_path / "grids.json")
  kwargs = dict(key=jax.random.PRNGKey(2), num_warmup=16, max_evals=5, cache=path,
                model_id="oracle")
  first = tuning.tune_time_grid("unipc", VP, score_fn, SHAPE, 4, **kwargs)
  assert len(json.load(open(path))) == 1

  def never_called(x, t):
    raise AssertionError("the cached grid must not evaluate the model")

  np.testing.assert_array_equal(tuning.tune_time_grid("unipc", VP, never_called, SHAPE, 4,
                                                      **kwargs), first)
  # another model: tuned anew (the error comes through the network's host callback)
  with pytest.raises((AssertionError, jax.errors.JaxRuntimeError), match="must not evaluate"):
    tuning.tune_time_grid("unipc", VP, never_called, SHAPE, 4, **{**kwargs, "model_id": "other"})


@pytest.mark.parametrize("call,match", [
    (dict(time_grid="quadratic"), "leave time_grid out"),
    (dict(num_steps=1), "num_steps >= 2"),
    (dict(num_warmup=0), "num_warmup"),
    (dict(cache="/tmp/x.json"), "model_id"),
    (dict(name="ode"), "fixed-grid samplers"),
])
def test_bad_tuning_requests_are_refused(call, match):
  call = dict(call)
  name, steps = call.pop("name", "unipc"), call.pop("num_steps", 4)
  with pytest.raises(InputError, match=match):
    tuning.tune_time_grid(name, VP, score_fn, SHAPE, steps, key=jax.random.PRNGKey(0),
                          max_evals=2, **call)


def test_compiled_once_gives_the_scores_and_compiles_the_network_once_for_many_programs():
  traces = []

  def counted_score(x, t):
    traces.append(x.shape)
    return score_fn(x, t)

  once = tuning.compiled_once(counted_score)
  x, t = jax.random.normal(jax.random.PRNGKey(0), SHAPE), jnp.full((SHAPE[0],), 0.3)
  for steps in (3, 4, 5):  # three candidate programs, as tune_time_grid builds them
    sampler = get_sampler("unipc", VP, SHAPE, steps)
    got, _ = sampler(jax.random.PRNGKey(1), once, x_T=x)
    want, _ = sampler(jax.random.PRNGKey(1), score_fn, x_T=x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert traces == [SHAPE]  # traced (and compiled) once for the three programs
  np.testing.assert_allclose(jax.jit(once)(x, t), score_fn(x, t), rtol=1e-6)
