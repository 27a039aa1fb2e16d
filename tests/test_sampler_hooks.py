"""Per-step hooks of the samplers (sgm_jax/sampling/base.py): hook(x, t, key) -> x after every
update, the way inpainting and colorization plug into any sampler (sgm_jax/controllable/)."""
import functools
import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import controllable as ctl
from sgm_jax import sampling, sde_lib, toy
from sgm_jax.errors import InputError

pytestmark = pytest.mark.usefixtures("fast_compiles")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VP = sde_lib.VPSDE()
GM = toy.GaussianMixture.create(jnp.array([[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5]]),
                                jnp.array([0.3, 0.4]), jnp.array([0.5, 0.5]))
SHAPE, STEPS = (8, 3), 4
# (sampler, options, hook calls per step): every fixed-step sampler and the variants whose loops
# differ (pc's corrector scan, rhoRK's stages in y = x / alpha, the final denoising jump).
CASES = [
    ("pc", {}, 2),
    ("pc", {"predictor": "none", "n_steps_each": 2, "denoise": True}, 2),
    ("pc", {"predictor": "ancestral", "corrector": "none"}, 1),
    ("milstein", {}, 1),
    ("ode", {"solver": "euler"}, 1),
    ("ode", {"solver": "heun"}, 1),
    ("ode", {"solver": "rk4", "denoise": True}, 1),
    ("ddim", {}, 1),
    ("ddim", {"eta": 1.0}, 1),
    ("heun", {}, 1),
    ("edm_sde", {}, 1),
    ("edm_sde", {"S_churn": 0.0, "denoise": True}, 1),
    ("dpm_solver", {"denoise": True}, 1),
    ("dpm_solver_sde", {}, 1),
    ("deis", {}, 1),
    ("deis", {"method": "rhork"}, 1),
    ("ipndm", {}, 1),
    ("deis", {"thresholding": "clip", "data_range": (0.5, 1.0), "denoise": True}, 1),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in options.items())}" for name, options, _ in CASES]


class Recorder:
  """A hook that zeros coordinate 0 and records, at run time, each call's time and key."""

  def __init__(self):
    self.times, self.keys = [], []

  def _record(self, t, key):
    self.times.append(float(t))
    self.keys.append(tuple(np.asarray(key).ravel().tolist()))

  def __call__(self, x, t, key):
    jax.debug.callback(self._record, t, jax.random.key_data(key))
    return x.at[:, 0].set(0.0)


@functools.lru_cache(maxsize=None)
def _runs(case):
  """CASES[case]'s sampler without a hook, with the identity hook (both from the same x_T and key)
  and with a Recorder, each called as users call it, in one jitted program: one XLA compile
  instead of three for the two tests below (compiling, not running, is their cost)."""
  name, options, _ = CASES[case]
  sampler = sampling.get_sampler(name, VP, SHAPE, STEPS, **options)
  score_fn, recorder = GM.score_fn(VP), Recorder()
  x_T = VP.prior_sampling(jax.random.PRNGKey(1), SHAPE)
  plain, identity, recorded = jax.jit(lambda: (
      sampler(jax.random.PRNGKey(2), score_fn, x_T),
      sampler(jax.random.PRNGKey(2), score_fn, x_T, hook=lambda x, t, key: x),
      sampler(jax.random.PRNGKey(0), score_fn, hook=recorder)))()
  jax.effects_barrier()
  return sampler, plain, identity, recorded, recorder


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_hook_runs_after_every_update(case):
  name, options, per_step = CASES[case]
  sampler, _, _, (x, nfe), recorder = _runs(case)
  x = np.asarray(x)
  assert int(nfe) == sampler.info["nfe"]
  np.testing.assert_array_equal(x[:, 0], 0.0)  # the hook's projection holds in the output
  assert np.all(np.isfinite(x)) and np.all(np.abs(x[:, 1:]) > 0)
  # One call per update, at the time it reached, then one at t = 0 after the denoising jump.
  expected = np.repeat(np.asarray(sampler.info["ts"][1:], np.float32), per_step)
  if options.get("denoise"):
    expected = np.append(expected, 0.0)
  np.testing.assert_allclose(sorted(recorder.times, reverse=True), expected, rtol=1e-6)
  assert len(set(recorder.keys)) == len(expected)  # a key of its own for each call
  if "data_range" in options:  # thresholding acts before the hook, which has the last word
    assert np.all((x[:, 1:] >= 0.5) & (x[:, 1:] <= 1.0))


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_identity_hook_leaves_the_sampler_unchanged(case):
  _, (plain, nfe_plain), (hooked, nfe), _, _ = _runs(case)
  assert int(nfe) == int(nfe_plain)
  # Equal up to rounding: heun and rhoRK carry x = alpha y instead of y when hooked.
  np.testing.assert_allclose(np.asarray(hooked), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_hook_arguments_are_traced():
  """A hook passed as a Partial reuses the compiled sampler for new arrays."""
  traces = []

  def set_first(value, x, t, key):
    traces.append(1)  # runs when traced only
    return x.at[:, 0].set(value)

  sampler, score_fn = sampling.get_sampler("ddim", VP, SHAPE, STEPS), GM.score_fn(VP)
  for value in (0.25, -0.5):
    hook = jax.tree_util.Partial(set_first, jnp.float32(value))
    x, _ = sampler(jax.random.PRNGKey(0), score_fn, hook=hook)
    np.testing.assert_array_equal(np.asarray(x)[:, 0], value)
  assert len(traces) == 1


def test_samplers_without_fixed_steps_refuse_a_hook():
  hook = lambda x, t, key: x
  for solver in ("dopri5", "tsit5"):
    sampler = sampling.get_sampler("ode", VP, SHAPE, STEPS, solver=solver)
    assert not sampler.accepts_hook
    with pytest.raises(InputError, match=f"solver '{solver}'.*fixed-step solver.*'euler'"):
      sampler(jax.random.PRNGKey(0), GM.score_fn(VP), hook=hook)
    with pytest.raises(InputError, match="fixed-step solver"):
      ctl.get_inpainter("ode", VP, SHAPE, STEPS, solver=solver)
  with pytest.raises(InputError, match=r"hook must be callable as hook\(x, t, key\)"):
    sampling.get_sampler("ddim", VP, SHAPE, STEPS)(jax.random.PRNGKey(0), GM.score_fn(VP),
                                                  hook="zero")


@pytest.mark.parametrize("method", ctl.METHODS)
def test_every_sampler_inpaints(method):
  """Every sampler of the registry is an inpainting method; the known pixels come back exactly
  (the distributions are checked on mixture oracles in tests/test_controllable.py)."""
  assert sorted(ctl.METHODS) == sorted(sampling.SAMPLERS)
  images = GM.sample(jax.random.PRNGKey(3), SHAPE[0])
  known = np.array([True, False, True])
  inpaint = ctl.get_inpainter(method, VP, SHAPE, STEPS)
  x, nfe = inpaint(jax.random.PRNGKey(4), GM.score_fn(VP), images, known)
  x = np.asarray(x)
  assert int(nfe) == inpaint.info["nfe"] and np.all(np.isfinite(x))
  np.testing.assert_array_equal(x[:, known], np.asarray(images)[:, known])
  assert not np.allclose(x[:, 1], np.asarray(images)[:, 1])


def test_controllable_has_no_sampler_loops_of_its_own():
  """Inpainting and colorization are hooks: no loop or ODE solve, and no private name of a
  sampling module, under sgm_jax/controllable/."""
  loops = re.compile(r"\blax\.scan\b|\bscan\(|fori_loop|while_loop|diffeqsolve")
  modules = "base|pc|ddim|deis|dc|deis_coefficients|dpm_solver|heun|milstein|ode|schedules"
  private = re.compile(rf"\b({modules}|data_prediction)\._\w"
                       r"|from sgm_jax\.sampling[\w.]* import .*\b_\w")
  files = sorted(glob.glob(os.path.join(ROOT, "sgm_jax", "controllable", "*.py")))
  assert len(files) >= 4
  for path in files:
    with open(path) as f:
      source = f.read()
    assert not loops.search(source), (path, loops.search(source).group())
    assert not private.search(source), (path, private.search(source).group())
