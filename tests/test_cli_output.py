"""What main.py prints: one line for a mistake in the input, the traceback for a fault, and the
project's own progress lines without the libraries' INFO chatter unless --verbosity asks."""
import os
import re
import sys

import prewarmed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--mode", "train", "--config", "configs/toy_2d.py", "--config.training.n_iters=2",
         "--config.training.snapshot_freq=2", "--config.training.snapshot_freq_for_preemption=1"]
# main.py with the train mode's run_train replaced by a function that fails like a bug would
FAULTY = ("import sys; sys.path.insert(0, {root!r}); sys.argv = ['main.py'] + {args!r}\n"
          "import main\nfrom sgm_jax.cli import train\n"
          "def run_train(config, workdir):\n  return {{}}['no such key']\n"
          "train.run_train = run_train\nmain.run()\n")
# XLA's optimizations only cost compile time for these two-step toy runs (67 -> 24 s of CPU)
ENV = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="true")


def _run(*args):
  return prewarmed.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600)


def test_a_fault_keeps_its_traceback_and_exit_code_1(tmp_path):
  args = TRAIN + ["--workdir", str(tmp_path)]
  res = _run("-c", FAULTY.format(root=ROOT, args=args))
  assert res.returncode == 1, res.stderr[-2000:]
  assert "Traceback" in res.stderr and "KeyError: 'no such key'" in res.stderr
  assert "not a problem with the config, flags or files" in res.stderr


def test_a_mistake_in_the_input_is_one_line_and_exit_code_2(tmp_path):
  res = _run("main.py", *TRAIN, "--workdir", str(tmp_path), "--config.training.sde=vpsd")
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert res.stderr.strip().splitlines()[-1].startswith("error: unknown SDE 'vpsd'")


def _info_lines(stderr):
  """absl's INFO lines as (source file, message)."""
  return re.findall(r"^I\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] (.*)$", stderr, re.M)


def test_library_info_lines_only_with_verbosity(tmp_path):
  res = _run("main.py", *TRAIN, "--workdir", str(tmp_path / "quiet"))
  assert res.returncode == 0, res.stderr[-2000:]
  sources = {source for source, _ in _info_lines(res.stderr)}
  assert sources == {"train.py"}, sources  # "model mlp with ... parameters"
  res = _run("main.py", *TRAIN, "--workdir", str(tmp_path / "verbose"), "--verbosity=1")
  assert res.returncode == 0, res.stderr[-2000:]
  sources = {source for source, _ in _info_lines(res.stderr)}
  assert "train.py" in sources and len(sources) > 1, sources  # Orbax's lines too
