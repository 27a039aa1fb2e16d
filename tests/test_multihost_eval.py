"""--mode eval over several processes (jax.distributed over loopback, gloo between CPU devices)
computes, all by itself, what one process with all their devices computes, and resumes from the
per-batch files of an interrupted evaluation.

The checkpoint is the tiny digits Mixer of tests/test_multihost.py (its data read from .npz files
of the digits), saved untrained; each run is main.py in subprocesses with a fake feature network
(the channel means as features: EfficientNet would cost minutes on CPU), patched in by a small
driver before main.py runs.
"""
import json
import os
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _run_helpers import save_untrained_checkpoints  # noqa: E402
from test_multihost import (ROOT, _finish, _gloo_available, _log, _start,  # noqa: E402
                            _tiny_digits_config, digits_npz, tiny_digits)

STEP = 4
# Every part of the evaluation, each with a few examples; 2 batches of each of loss, bits/dim and
# samples (batches of 6, padded to 8 over 4 devices), so that a resumed run has work left.
EVAL = {"batch_size": 6, "enable_loss": True, "loss_num_examples": 12, "enable_bpd": True,
        "bpd_num_examples": 12, "rtol": 1e-3, "atol": 1e-3, "enable_denoising_error": True,
        "denoising_examples": 8, "denoising_reference": 16, "denoising_levels": 2,
        "enable_sampling": True, "reference_examples": 16,
        "feature_extractor": "effnet"}  # the driver's stand-in network under effnet's name


def _args(data_dir, **eval_overrides):
  overrides = [f"--config.eval.{k}={v}" for k, v in dict(EVAL, **eval_overrides).items()]
  return [*tiny_digits(data_dir), *overrides, "--mode", "eval", "--sampler", "deis",
          "--num_steps", "2", "--num_samples", "10"]


_DRIVER = """
import runpy, sys
sys.path.insert(0, {root!r})
import jax
import numpy as np
from sgm_jax.evaluation import features

def fake_extractor(name, weights_path=None, *args, **kwargs):
  def network(variables, x):
    m = x.mean(axis=(1, 2, 3))
    return x.mean(axis=(1, 2)), 10.0 * jax.numpy.stack([m, m * m, x.std(axis=(1, 2, 3))], -1)
  def preprocess(images):
    x = np.asarray(images, np.float32)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
  return features.FeatureExtractor(name, features.METRIC_NAMES[name], 3, 3, 8, 64, "fake",
                                   preprocess, jax.jit(network), None)

features.get_feature_extractor = fake_extractor
features.resolve_weights = lambda name, path=None: "fake"
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path({main!r}, run_name="__main__")
"""


def _eval(workdir, data_dir, num_processes, devices, log_dir, name, rows=1, **eval_overrides):
  """The results row of main.py --mode eval in `num_processes` x `devices`, the `rows`-th."""
  code = _DRIVER.format(root=ROOT, main=os.path.join(ROOT, "main.py"))
  procs = _start(["--workdir", str(workdir), *_args(data_dir, **eval_overrides)], num_processes,
                 devices, log_dir, name, program=["-c", code])
  for i, code in enumerate(_finish(procs, log_dir, name)):
    assert code == 0, f"{name} process {i}: {_log(log_dir, name, i)[-3000:]}"
  with open(os.path.join(workdir, "eval", "results.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert len(lines) == rows, lines  # one per run, written by process 0
  return lines[-1]


def _save_checkpoint(workdir, data_dir):
  """The untrained tiny digits state as the checkpoint of step STEP (no step compiled)."""
  save_untrained_checkpoints(str(workdir), _tiny_digits_config(data_dir), (STEP,))


COMPARED = ["loss", "bpd", "bpd_stderr", "FD-EffNet", "IS (effnet)", "nfe", "out_of_range",
            "max_abs"]


def _assert_same(result, expected, keys=COMPARED):
  for key in keys:
    np.testing.assert_allclose(result[key], expected[key], rtol=1e-4, err_msg=key)


def test_two_processes_evaluate_like_one_process_with_all_devices_and_resume(tmp_path, digits_npz):
  """1 process x 4 devices and 2 processes x 2 devices each evaluate the checkpoint in a workdir
  of their own, every batch computed by themselves, and give the same numbers. Then the 2 x 2
  job resumes from its progress files with the first batch of loss and samples deleted (the batch
  of samples whose examples lie on both processes' devices: the second one is 2 samples, both on
  process 0): it computes that batch again, reads the other, and reports the same numbers."""
  if not _gloo_available():
    pytest.skip("no gloo CPU collectives in this jaxlib")
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  _save_checkpoint(one, digits_npz)
  shutil.copytree(one, two)
  alone = _eval(one, digits_npz, 1, 4, tmp_path, "eval_1x4")
  together = _eval(two, digits_npz, 2, 2, tmp_path, "eval_2x2")
  progress = two / "eval" / f"ckpt_{STEP}"
  parts = sorted(p.name for p in progress.iterdir() if p.is_dir())
  assert len(parts) == 3, parts  # loss, bits/dim and samples
  for part in parts:
    assert sorted(os.listdir(progress / part)) == ["batch_000000.npz", "batch_000001.npz"]
  assert "evaluation of checkpoint" in _log(tmp_path, "eval_2x2", 0, "out")
  assert "evaluation" not in _log(tmp_path, "eval_2x2", 1, "out")
  assert together["loss_examples"] == alone["loss_examples"] == 12
  assert together["bpd_examples"] == alone["bpd_examples"] == 12
  assert together["num_samples"] == alone["num_samples"] == 10
  _assert_same(together, alone)
  for key in ("eps_mse", "x0_mse"):
    np.testing.assert_allclose(together["denoising_error"][key], alone["denoising_error"][key],
                               rtol=1e-4, err_msg=key)

  resumed_parts = [p for p in parts if not p.startswith("bpd")]  # bits/dim: the costly part
  kept = {}
  for part in resumed_parts:
    os.remove(progress / part / "batch_000000.npz")
    kept[part] = os.stat(progress / part / "batch_000001.npz").st_mtime_ns
  resumed = _eval(two, digits_npz, 2, 2, tmp_path, "eval_2x2_resumed", rows=2, enable_bpd=False,
                  enable_denoising_error=False)
  for part in resumed_parts:  # batch 0 computed again and written (by process 0), batch 1 read
    assert sorted(os.listdir(progress / part)) == ["batch_000000.npz", "batch_000001.npz"]
    assert os.stat(progress / part / "batch_000001.npz").st_mtime_ns == kept[part]
  _assert_same(resumed, together, [k for k in COMPARED if not k.startswith("bpd")])
