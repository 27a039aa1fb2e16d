"""`--nfe N` / `nfe=`: the sampler of a budget of score evaluations (sgm_jax/sampling/budget.py)
and the most steps of a sampler within it, counted exactly (the NFE a run reports)."""
import functools

import jax
import numpy as np
import pytest

from sgm_jax import sampling, sde_lib
from sgm_jax.errors import InputError
from sgm_jax.sampling import budget

# The pc case builds samplers of 30 grid lengths, each running its host coefficients op by op
# (dozens of tiny float64 programs per length): XLA's optimizations only cost compile time there.
pytestmark = pytest.mark.usefixtures("fast_compiles")

SHAPE = (2, 3)
SDE = sde_lib.VPSDE(N=100)


def _nfe_of(name, options):
  @functools.lru_cache(maxsize=None)
  def nfe_of(steps):
    return sampling.get_sampler(name, SDE, SHAPE, num_steps=steps, **dict(options)).info.get("nfe")
  return nfe_of


@pytest.mark.parametrize("name,options", [
    ("pc", {}), ("pc", dict(denoise=True)), ("pc", dict(n_steps_each=2)), ("heun", {}),
    ("heun", dict(denoise=True)), ("unipc", {}), ("deis", dict(method="rhork")),
    ("ode", dict(solver="rk4")), ("edm_sde", {}), ("ddim", {})])
def test_steps_for_nfe_are_the_most_that_fit(name, options):
  """Against a linear search: the largest number of steps whose exact NFE is within the budget,
  for samplers of 1, 2 (n_steps_each), 2 n - 1 (heun) and 4 (rk4) evaluations per step, with and
  without the final denoising evaluation."""
  nfe_of = _nfe_of(name, options)
  for nfe in (3, 4, 5, 10, 11, 30):
    fitting = [k for k in range(1, nfe + 1) if nfe_of(k) <= nfe]
    if not fitting:
      with pytest.raises(InputError, match="needs at least"):
        budget.steps_for_nfe(nfe, name, nfe_of)
      continue
    assert budget.steps_for_nfe(nfe, name, nfe_of) == max(fitting), (name, options, nfe)


def test_the_table_covers_every_budget_from_its_first_row():
  rows = budget.NFE_TABLE
  assert [r.min_nfe for r in rows] == sorted({r.min_nfe for r in rows})  # increasing, no repeats
  for row in rows:
    assert row.sampler in sampling.SAMPLERS
    assert budget.table_row(row.min_nfe) is row
    if row.min_nfe > rows[0].min_nfe:
      assert budget.table_row(row.min_nfe - 1) is rows[rows.index(row) - 1]
  assert budget.table_row(10_000) is rows[-1]
  with pytest.raises(InputError, match=f"give nfe >= {rows[0].min_nfe}"):
    budget.table_row(rows[0].min_nfe - 1)


def _resolve(nfe, sampler=None, num_steps=None, **options):
  def nfe_of_steps(name, steps, opts):
    return _nfe_of(name, opts)(steps)
  return budget.resolve(nfe, sampler, num_steps, options, nfe_of_steps, "deis", lambda _: 7)


def test_resolve_picks_the_table_row_and_keeps_the_callers_options():
  for row in budget.NFE_TABLE:
    for nfe in (row.min_nfe, row.min_nfe + 7):
      got = _resolve(nfe, score_scale=1.5)
      expected = budget.table_row(nfe)
      assert got.sampler == expected.sampler and got.options["score_scale"] == 1.5
      nfe_of = _nfe_of(got.sampler, budget.without_tuned_grid(got.options))  # same NFE
      assert nfe_of(got.num_steps) <= nfe
      assert got.num_steps == expected.max_steps or nfe < nfe_of(got.num_steps + 1)
  assert _resolve(None) == budget.Resolved("deis", 7, {})  # no budget: the caller's defaults
  assert _resolve(None, "pc", 3).num_steps == 3
  assert _resolve(21, "pc").num_steps == 10  # reverse diffusion + Langevin: 2 per step


def test_a_rows_max_steps_caps_a_larger_budget(monkeypatch):
  monkeypatch.setattr(budget, "NFE_TABLE", (budget.BudgetRow(3, "heun", max_steps=4),))
  assert _resolve(100) == budget.Resolved("heun", 4, {})  # 7 evaluations, not 100
  assert _resolve(5).num_steps == 3  # below the cap: the most that fit
  assert _resolve(100, "heun").num_steps == 50  # a named sampler spends the budget


def test_the_first_rows_tuned_unipc_spends_at_most_seven_steps():
  """More tuned UniPC steps measured worse (README, "Samplers by budget"): budgets of 8 to 26
  evaluations take 7 steps, smaller ones all they can."""
  unipc = _nfe_of("unipc", {})
  for nfe, steps in ((3, 3), (5, 5), (7, 7), (10, 7), (26, 7)):
    got = _resolve(nfe)
    assert got.sampler == "unipc" and got.num_steps == steps and unipc(steps) == steps, nfe


@pytest.mark.parametrize("kwargs,message", [
    (dict(nfe=0), "positive integer"), (dict(nfe=2.5), "positive integer"),
    (dict(nfe=True), "positive integer"), (dict(nfe=5, num_steps=3), "not both"),
    (dict(nfe=20, sampler="ode"), "adaptive"), (dict(nfe=1, sampler="heun", denoise=True),
                                                 "needs at least 2")])
def test_bad_budgets_are_named(kwargs, message):
  with pytest.raises(InputError, match=message):
    _resolve(**kwargs)


def test_a_sampler_run_spends_what_the_budget_counted():
  """The NFE the sampler counts while it runs equals the one the steps were chosen by."""
  got = _resolve(12, "heun")
  sampler = sampling.get_sampler("heun", SDE, SHAPE, num_steps=got.num_steps)
  _, nfe = sampler(jax.random.PRNGKey(0), lambda x, t: -x)
  assert int(nfe) == sampler.info["nfe"] == 11 and got.num_steps == 6
  assert np.isfinite(float(nfe))
