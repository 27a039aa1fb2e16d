"""A pytest plugin that splits each test's time in the test process into JAX's own durations
(XLA backend compiles, jaxpr tracing, lowering to MLIR, Orbax reads and writes, ...) from
`jax.monitoring`, to find where the suite's time goes:

    PYTHONPATH=tests .venv/bin/python -m pytest -q -n 2 --dist loadfile -p compile_profile tests

writes one JSON list per worker, `compile_profile_<worker>.json` ({"id", "wall", <event>: seconds})
in $SGM_JAX_COMPILE_PROFILE_DIR (default: the current directory). Subprocesses are not counted.
"""
import collections
import json
import os
import time

import jax.monitoring
import pytest

_totals = collections.Counter()
_rows = []


def _add(event, duration, **_):
  _totals[event] += duration


jax.monitoring.register_event_duration_secs_listener(_add)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  before, start = dict(_totals), time.perf_counter()
  yield
  spent = {k: v - before.get(k, 0.0) for k, v in _totals.items() if v > before.get(k, 0.0)}
  _rows.append({"id": item.nodeid, "wall": time.perf_counter() - start, **spent})


def pytest_sessionfinish(session):
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  folder = os.environ.get("SGM_JAX_COMPILE_PROFILE_DIR", ".")
  with open(os.path.join(folder, f"compile_profile_{worker}.json"), "w") as f:
    json.dump(_rows, f)
