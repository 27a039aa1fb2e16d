"""benchmarks/device_check.py at --small size on 2 CPU devices: every part runs (training in
float32 and bfloat16 on one and two devices, DEIS and PC sampling) and the JSON says what ran."""
import json
import os
import sys

import prewarmed
from xla_flags import with_device_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_small_runs_every_part(tmp_path):
  out = tmp_path / "device_check.json"
  env = dict(os.environ, XLA_FLAGS=with_device_count(2),
             JAX_DISABLE_MOST_OPTIMIZATIONS="true")  # compile time is all there is at this size
  result = prewarmed.run([sys.executable, os.path.join(ROOT, "benchmarks", "device_check.py"),
                           "--small", "--out", str(out), "--pc-steps", "5"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["env"]["device_count"] == 2 and report["env"]["small"]
  rows = {(r["part"], r["dtype"], r["devices"]): r for r in report["rows"]}
  for dtype in ("float32", "bfloat16"):
    for devices in (1, 2):
      train = rows[("train", dtype, devices)]
      assert train["finite"] and train["rate"] > 0 and train["compiled_bytes"] > 0
      assert abs(train["examples_per_s"] * train["seconds"] - 4 * devices) < 1e-6  # batch 4 each
    deis, pc = rows[("sample deis", dtype, 1)], rows[("sample pc", dtype, 1)]
    assert deis["nfe"] == 10 and pc["num_steps"] == 5 and pc["nfe"] >= 5
    assert deis["samples_dtype"] == pc["samples_dtype"] == "float32"  # bf16 nets: float32 state
    assert deis["finite"] and pc["finite"]
  # One network for all rows: the same parameter count in both dtypes.
  assert rows[("train", "float32", 1)]["params"] == rows[("train", "bfloat16", 1)]["params"]
  assert "| train | bfloat16 | 2 | 4 |" in result.stdout and "written to" in result.stdout
