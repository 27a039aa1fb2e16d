"""A sampler for a budget of score evaluations: `--nfe N` (and `nfe=` in Python).

With no sampler named, `NFE_TABLE` picks the project's best sampler for the budget (the README's
"Samplers by budget" shows the measurements behind each row); with a sampler named, the budget
sets its number of steps. Either way the number of steps is the largest whose exact NFE (the
sampler's own count, final denoising step and all) fits the budget, so a run never spends more
than N evaluations, and the NFE it reports is what it spent.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

from sgm_jax.errors import InputError


# time_grid=TUNED_GRID: the grid fitted to the checkpoint being sampled (sgm_jax/cli/tuned_grid.py
# resolves it); it does not change the number of evaluations
TUNED_GRID = "tuned"


def without_tuned_grid(options: Mapping[str, Any]) -> dict:
  """`options` on the sampler's default grid instead of the tuned one: the same NFE."""
  tuned = isinstance(options.get("time_grid"), str) and options["time_grid"] == TUNED_GRID
  return {k: v for k, v in options.items() if not (tuned and k == "time_grid")}


@dataclasses.dataclass(frozen=True)
class BudgetRow:
  """From `min_nfe` evaluations up to the next row's, `sampler` with `options`."""

  min_nfe: int
  sampler: str
  options: tuple = ()  # (name, value) pairs: the row's own options, below the caller's
  max_steps: Optional[int] = None  # more steps measured worse: a larger budget is not spent
  why: str = ""  # the measurement behind the row (README, "Samplers by budget")


# Budgets from 3 evaluations on, in increasing min_nfe. Measured with FD-Domain on three
# independently trained main-job checkpoints (benchmarks/nfe_frontier.py; README, "Samplers by
# budget"); a row changes only for a sampler better on every one of them. A row's options sit
# above the config's (score_scale=1 turns a config's scale off).
NFE_TABLE = (
    BudgetRow(3, "unipc", (("score_scale", 1.0), ("time_grid", TUNED_GRID)), max_steps=7,
              why="5, 7 and 10 NFE on a grid tuned for the checkpoint (cli/tuned_grid.py): 7 steps "
              "below 5 and 10 on every checkpoint (33.9 against 35.2 and 36.4), 5 below DEIS-10 "
              "(38.1), 10 below UniPC-10 on the default grid (38.5); the stochastic samplers at "
              "19-20 NFE are not better on every checkpoint or leave 0.9 % of pixels out of range; "
              "a score scale of 1.02 raised UniPC-5's FD by a sixth"),
    BudgetRow(27, "restart", max_steps=10,
              why="27 NFE (10 main steps, 2 restarts): PC-500's FD-Domain on average (1.00x; "
              "0.86-1.09x), below edm_sde and dpm_solver_sde at 29-30 NFE on average; restart "
              "at 43 NFE is worse"),
    BudgetRow(49, "edm_sde", max_steps=25,
              why="49 NFE: 0.96x PC-500's FD-Domain on average, below dpm_solver_sde at 50 NFE "
              "on every checkpoint; edm_sde at 99 NFE and PC at 201 NFE are worse on average"),
    BudgetRow(1001, "pc", why="PC-500: the highest precision; FD-Domain below edm_sde-25's on one "
              "checkpoint of three"),
)


def table_row(nfe: int) -> BudgetRow:
  """The NFE_TABLE row of a budget."""
  check_nfe(nfe)
  if nfe < NFE_TABLE[0].min_nfe:
    raise InputError(f"nfe={nfe} is below the smallest budget with a sampler, "
                     f"{NFE_TABLE[0].min_nfe}; give nfe >= {NFE_TABLE[0].min_nfe}")
  return [row for row in NFE_TABLE if row.min_nfe <= nfe][-1]


def check_nfe(nfe: Any) -> int:
  if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
    raise InputError(f"nfe must be a positive integer (score evaluations per sample), got {nfe!r}")
  return nfe


def steps_for_nfe(nfe: int, sampler: str, nfe_of_steps: Callable[[int], Optional[int]]) -> int:
  """The largest number of steps whose NFE (`nfe_of_steps(steps)`, non-decreasing in steps)
  is at most `nfe`; an InputError when even one step costs more, or the sampler's NFE is not
  known in advance (an adaptive solver)."""
  check_nfe(nfe)
  least = nfe_of_steps(1)
  if least is None:
    raise InputError(f"sampler {sampler!r} with these options has no NFE known before it runs "
                     "(an adaptive solver); give num_steps or a fixed-step solver instead of nfe")
  if least > nfe:
    raise InputError(f"sampler {sampler!r} needs at least {least} score evaluations with these "
                     f"options; nfe={nfe} is too few")
  lo, hi = 1, nfe  # nfe_of_steps(lo) <= nfe; every sampler spends >= 1 evaluation per step
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if nfe_of_steps(mid) <= nfe:
      lo = mid
    else:
      hi = mid - 1
  return lo


@dataclasses.dataclass(frozen=True)
class Resolved:
  sampler: str
  num_steps: int
  options: dict  # the options to run with (the caller's, above the table row's)


def resolve(nfe: Optional[int], sampler: Optional[str], num_steps: Optional[int],
            options: Mapping[str, Any], nfe_of_steps: Callable[[str, int, dict], Optional[int]],
            default_sampler: str, default_steps: Callable[[str], int]) -> Resolved:
  """The sampler, steps and options of a request.

  Without `nfe`: `sampler` (or `default_sampler`) in `num_steps` (or `default_steps(sampler)`).
  With `nfe`: `sampler`, or the NFE_TABLE row's sampler with its options under `options`, in
  the most steps that fit (`nfe_of_steps(sampler, steps, options)`, options on the default grid
  where they ask for a tuned one; at most the row's max_steps); num_steps must then be None.
  """
  options = dict(options)
  if nfe is None:
    sampler = sampler or default_sampler
    return Resolved(sampler, int(num_steps if num_steps is not None else default_steps(sampler)),
                    options)
  check_nfe(nfe)
  if num_steps is not None:
    raise InputError(f"give nfe ({nfe}) or num_steps ({num_steps}), not both: nfe sets the "
                     "number of steps")
  max_steps = None
  if sampler is None:
    row = table_row(nfe)
    sampler, options, max_steps = row.sampler, dict(row.options, **options), row.max_steps
  steps = steps_for_nfe(nfe, sampler, lambda k: nfe_of_steps(sampler, k,
                                                             without_tuned_grid(options)))
  return Resolved(sampler, steps if max_steps is None else min(steps, max_steps), options)
