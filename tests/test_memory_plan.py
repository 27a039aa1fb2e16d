"""benchmarks/memory_plan.py: the largest-batch extrapolation, the compile on this machine's
backend, and a clear error for a compiler target it does not know."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import memory_plan  # noqa: E402  (a script of benchmarks/)

pytestmark = pytest.mark.usefixtures("fast_compiles")  # the compiles are the test's whole cost


def test_largest_batch_solves_fixed_plus_per_example_times_batch():
  rows = [{"batch": 64, "bytes": 1e9 + 64 * 1e8}, {"batch": 8, "bytes": 1e9 + 8 * 1e8},
          {"batch": 1, "bytes": 1.0}]  # only the two largest batches count
  assert memory_plan.largest_batch(rows, 16) == 150  # (16e9 - 1e9) / 1e8
  assert memory_plan.largest_batch(rows[:1], 16) is None
  flat = [{"batch": 1, "bytes": 5e8}, {"batch": 8, "bytes": 5e8}]
  assert memory_plan.largest_batch(flat, 16) is None  # no growth: no extrapolation


def test_budget_days_are_score_sde_s_examples_times_flops_over_the_used_peak():
  flops = 62.8e9  # DDPM++ cont.'s training FLOPs per example
  days = memory_plan.budget_days(flops, peak_tflops=989.0, utilization=0.3)
  assert days * 86400 * 989e12 * 0.3 == pytest.approx(1_300_000 * 128 * flops)
  assert memory_plan.budget_days(flops, 989.0, 0.6) == pytest.approx(days / 2)


def test_local_compile_reports_parameters_flops_and_memory_growing_with_the_batch(tmp_path,
                                                                                  capsys):
  out = tmp_path / "plan.json"
  rows = memory_plan.main(["--configs", "configs/digits.py", "--batches", "1", "16",
                           "--dtypes", "float32", "--remat", "off", "--out", str(out),
                           "--peak-tflops-float32", "0.001", "--utilization", "0.5"])
  assert [r["batch"] for r in rows] == [1, 16] and out.exists()
  assert all(r["target"] == "local" and r["params"] > 0 for r in rows)
  assert rows[1]["bytes"] > rows[0]["bytes"] > 0
  assert rows[0]["flops_per_example"] > 0
  line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| configs/"))
  days = memory_plan.budget_days(rows[1]["flops_per_example"], 0.001, 0.5)  # the larger batch
  assert days > 10 and line.endswith(f" | {days:.1f} |"), line  # the float32 peak given


def test_a_rerun_compiles_only_the_rows_missing_from_its_out_file(tmp_path, monkeypatch):
  out = str(tmp_path / "plan.json")
  args = ["--configs", "configs/digits.py", "--dtypes", "float32", "--remat", "off", "--out", out]
  compiled = []
  def fake_compile(path, batch, dtype, remat, device=None):
    compiled.append(batch)
    if len(compiled) == 2:
      raise KeyboardInterrupt  # the run stops during its second compile
    return dict(config=path, batch=batch, dtype=dtype, remat=remat, params=10, compile_s=0.0,
                bytes=1000 * batch, flops_per_example=1.0)
  monkeypatch.setattr(memory_plan, "compile_step", fake_compile)
  with pytest.raises(KeyboardInterrupt):
    memory_plan.main(args + ["--batches", "8", "1"])
  rows = memory_plan.main(args + ["--batches", "1", "8", "64"])
  assert compiled == [8, 1, 1, 64]  # batch 8 was saved before the interruption
  assert [r["batch"] for r in rows] == [8, 1, 64]
  assert sorted(r["batch"] for r in memory_plan._read_rows(out).values()) == [1, 8, 64]
  assert memory_plan.main(args + ["--batches", "1", "8", "64"]) and compiled == [8, 1, 1, 64]


def test_an_unknown_target_is_one_error_naming_it():
  with pytest.raises(SystemExit, match="'gpu:h100'.*'local' or 'tpu:<generation>'"):
    memory_plan.target_device("gpu:h100")
