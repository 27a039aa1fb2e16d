"""tests/prewarmed.py gives what subprocess gives: a fresh process per call with its own exit
code, streams, directory, environment and XLA flags, and the same program semantics."""
import os
import signal
import subprocess
import sys
import time

import pytest

import prewarmed
from xla_flags import with_device_count

PROGRAM = """import os, sys
import jax
print(os.getcwd(), os.getpid(), os.environ.get("SGM_JAX_PREWARM_PROBE"), ",".join(sys.argv),
      jax.device_count(), __name__)
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture(params=["prewarmed", "plain"])
def mode(request, monkeypatch):
  if request.param == "plain":
    monkeypatch.setenv("SGM_JAX_TEST_NO_PREWARM", "1")
  return request.param


def test_run_gives_the_exit_code_streams_directory_environment_and_xla_flags(tmp_path, mode):
  env = dict(os.environ, SGM_JAX_PREWARM_PROBE="x1", XLA_FLAGS=with_device_count(3))
  res = prewarmed.run([sys.executable, "-c", PROGRAM, "3", "b"], cwd=tmp_path, env=env,
                      capture_output=True, text=True, timeout=120)
  assert res.returncode == 3, res.stderr[-2000:]
  cwd, pid, probe, args, devices, name = res.stdout.split(maxsplit=5)
  assert (cwd, probe, devices, name.strip()) == (str(tmp_path), "x1", "3", "__main__")
  assert args == "-c,3,b" and int(pid) != os.getpid()
  assert res.stderr == "to stderr\n"
  # Another device count in the next call: nothing of the first child's devices is left.
  env["XLA_FLAGS"] = with_device_count(2)
  again = prewarmed.run([sys.executable, "-c", PROGRAM, "0"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert again.returncode == 0 and again.stdout.split()[4] == "2"
  assert again.stdout.split()[1] != pid


def test_a_script_runs_as_main_with_its_folder_on_the_path(tmp_path, mode):
  (tmp_path / "helper_module_of_the_script.py").write_text("VALUE = 7\n")
  script = tmp_path / "script.py"
  script.write_text("import sys\nimport helper_module_of_the_script as h\n"
                    "print(__name__, h.VALUE, sys.argv)\n"
                    "raise KeyError('a fault')\n")
  res = prewarmed.run([sys.executable, str(script), "a"], capture_output=True, text=True,
                      timeout=120)
  assert res.returncode == 1
  assert res.stdout == f"__main__ 7 [{str(script)!r}, 'a']\n"
  assert "Traceback" in res.stderr and "KeyError: 'a fault'" in res.stderr


def test_popen_polls_waits_and_is_killed_like_a_subprocess(tmp_path, mode):
  out = open(tmp_path / "out.txt", "w")
  proc = prewarmed.Popen([sys.executable, "-c", "import time; print('up', flush=True); "
                          "time.sleep(300)"], stdout=out, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while "up" not in (tmp_path / "out.txt").read_text() and time.time() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None
  with pytest.raises(subprocess.TimeoutExpired):
    proc.wait(timeout=0.1)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL == proc.returncode
  out.close()


def test_run_kills_a_program_at_its_timeout(mode):
  start = time.time()
  with pytest.raises(subprocess.TimeoutExpired):
    prewarmed.run([sys.executable, "-c", "import time; time.sleep(300)"], timeout=1)
  assert time.time() - start < 60
