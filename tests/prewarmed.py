"""Python subprocesses for the tests, forked from an interpreter that has already imported JAX,
Flax and sgm-jax.

A `python main.py ...` of the tests spends about 2.3 s of CPU importing before it does anything
(jax alone about 1 s), and the suite starts some seventy of them. `run` and `Popen` here take the
same arguments as subprocess.run / subprocess.Popen for `[sys.executable, SCRIPT or -c CODE,
*args]` and give the same results: each call is a fresh process (its own pid, exit code, signals,
files, environment, working directory and standard streams), forked from a per-environment warm
interpreter (this file, run with --serve) whose only state is its imports. The warm interpreter
never touches a device: nothing XLA reads from the environment at start-up (XLA_FLAGS, e.g. the
number of CPU devices) has been read when a child sets its own. JAX reads its JAX_* variables at
import, so a warm interpreter serves only calls with its own environment (XLA_FLAGS and pytest's
PYTEST_CURRENT_TEST aside); another environment gets its own warm interpreter.
Anything else (another program, interpreter options, `input=`) runs as a plain subprocess, and
SGM_JAX_TEST_NO_PREWARM=1 makes every call one (to compare the two).
"""
import atexit
import gc
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

# What main.py, the benchmarks and the tests' scripts import before they do any work.
PREIMPORTS = ("numpy", "jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "diffrax",
              "absl.app", "absl.flags", "absl.logging", "ml_collections.config_flags",
              "sgm_jax.cli.evaluate", "sgm_jax.cli.sample", "sgm_jax.cli.train",
              "sgm_jax.cli.train_classifier", "sgm_jax.cli.controllable",
              "sgm_jax.cli.import_checkpoint", "sgm_jax.parallel")
# Read after start-up (XLA's flags when the first device is made), so a child may set its own.
LATE_ENV = ("XLA_FLAGS", "PYTEST_CURRENT_TEST")
_MAX_MESSAGE = 1 << 20


def _send(sock, message: dict, fds=()):
  socket.send_fds(sock, [json.dumps(message).encode()], list(fds))


def _receive(sock, max_fds=0):
  data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, max_fds)
  return (json.loads(data) if data else None), fds


# --- the warm interpreter -------------------------------------------------------------------

def _serve(fd: int):
  sock = socket.socket(fileno=fd)
  try:
    for name in PREIMPORTS:
      importlib.import_module(name)
    ready = threading.active_count() == 1  # fork copies only this thread
    gc.freeze()  # the imports' objects: never collected or copied in a child, faster exits
  except Exception as e:  # pylint: disable=broad-except
    print(f"tests/prewarmed.py: the warm interpreter could not import: {e!r}", file=sys.stderr)
    ready = False
  _send(sock, {"ready": ready})
  while ready:
    request, fds = _receive(sock, max_fds=3)
    if request is None:  # the test process closed its end (or died): stop
      break
    if request["op"] == "spawn":
      pid = os.fork()
      if pid == 0:
        sock.close()
        _child(request, fds)  # never returns
      for f in fds:
        os.close(f)
      _send(sock, {"pid": pid})
    elif request["op"] == "poll":
      pid, status = os.waitpid(request["pid"], os.WNOHANG)
      _send(sock, {"returncode": os.waitstatus_to_exitcode(status) if pid else None})
  os._exit(0)


def _child(request: dict, fds):
  """The forked process: the caller's streams, directory, environment and arguments, then the
  program as `python PROGRAM ARGS` runs it; exits the interpreter like it."""
  for target, fd in enumerate(fds):
    os.dup2(fd, target)
  for fd in set(fds):
    if fd > 2:
      os.close(fd)
  os.chdir(request["cwd"])
  os.environ.clear()
  os.environ.update(request["env"])
  argv = request["argv"]
  if argv[0] == "-c":
    sys.argv = ["-c", *argv[2:]]
    sys.path[0] = ""
    module = type(sys)("__main__")
    sys.modules["__main__"] = module
    exec(compile(argv[1], "<string>", "exec"), module.__dict__)  # pylint: disable=exec-used
  else:
    import runpy
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
    runpy.run_path(argv[0], run_name="__main__")
  sys.exit(0)


# --- the test process's side ----------------------------------------------------------------

class _Warm:
  """One warm interpreter (for one environment) and the socket to it."""

  def __init__(self, env: dict):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    self.lock = threading.Lock()
    self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve",
                                     str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                    env=env, stdin=subprocess.DEVNULL)
    theirs.close()
    self.sock = ours
    reply, _ = _receive(self.sock)
    self.ready = bool(reply and reply["ready"])

  def request(self, message: dict, fds=()):
    with self.lock:
      _send(self.sock, message, fds)
      reply, _ = _receive(self.sock)
    if reply is None:
      raise RuntimeError("tests/prewarmed.py: the warm interpreter stopped")
    return reply

  def close(self):
    self.sock.close()
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.process.kill()


_WARM: dict = {}


@atexit.register
def _close_all():
  for warm in _WARM.values():
    warm.close()
  _WARM.clear()


def _warm_for(env: dict):
  key = tuple(sorted((k, v) for k, v in env.items() if k not in LATE_ENV))
  if key not in _WARM:
    _WARM[key] = _Warm({k: v for k, v in env.items() if k not in LATE_ENV})
  warm = _WARM[key]
  return warm if warm.ready else None


def _forkable(args) -> bool:
  return (os.environ.get("SGM_JAX_TEST_NO_PREWARM") != "1" and len(args) >= 2
          and str(args[0]) == sys.executable and (str(args[1]) == "-c" and len(args) >= 3
                                                  or not str(args[1]).startswith("-")))


def _stream_fd(spec, default_fd: int, stack: list, stdout_fd=None) -> int:
  """An open descriptor for a Popen stdin/stdout/stderr argument (None: the caller's own)."""
  if spec is None:
    return default_fd
  if spec == subprocess.DEVNULL:
    fd = os.open(os.devnull, os.O_RDWR)
    stack.append(fd)
    return fd
  if spec == subprocess.STDOUT and stdout_fd is not None:
    return stdout_fd
  if isinstance(spec, int) and spec >= 0:
    return spec
  if hasattr(spec, "fileno"):
    if hasattr(spec, "flush"):
      spec.flush()
    return spec.fileno()
  raise ValueError(f"tests/prewarmed.py: unsupported stream argument {spec!r}")


class Popen:
  """subprocess.Popen for [sys.executable, SCRIPT | -c CODE, *args], forked from a warm
  interpreter where it can be (module docstring); pid, poll, wait, send_signal, kill,
  terminate and returncode as subprocess.Popen has them."""

  def __init__(self, args, *, cwd=None, env=None, stdin=None, stdout=None, stderr=None):
    self.args = [str(a) for a in args]
    self.returncode = None
    self._plain = None
    env = dict(os.environ if env is None else env)
    warm = _warm_for(env) if _forkable(self.args) else None
    if warm is None:
      self._plain = subprocess.Popen(self.args, cwd=cwd, env=env, stdin=stdin, stdout=stdout,
                                     stderr=stderr)
      self.pid = self._plain.pid
      return
    opened = []
    try:
      stdout_fd = _stream_fd(stdout, 1, opened)
      fds = [_stream_fd(stdin, 0, opened), stdout_fd, _stream_fd(stderr, 2, opened, stdout_fd)]
      self._warm = warm
      self.pid = warm.request({"op": "spawn", "argv": self.args[1:], "env": env,
                               "cwd": os.path.abspath(cwd or os.getcwd())}, fds)["pid"]
    finally:
      for fd in opened:
        os.close(fd)

  def poll(self):
    if self._plain is not None:
      self.returncode = self._plain.poll()
    elif self.returncode is None:
      self.returncode = self._warm.request({"op": "poll", "pid": self.pid})["returncode"]
    return self.returncode

  def wait(self, timeout=None):
    if self._plain is not None:
      self.returncode = self._plain.wait(timeout)
      return self.returncode
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.002
    while self.poll() is None:
      if deadline is not None and time.monotonic() >= deadline:
        raise subprocess.TimeoutExpired(self.args, timeout)
      time.sleep(pause)
      pause = min(2 * pause, 0.05)
    return self.returncode

  def send_signal(self, sig):
    if self.poll() is None:
      os.kill(self.pid, sig)

  def kill(self):
    self.send_signal(signal.SIGKILL)

  def terminate(self):
    self.send_signal(signal.SIGTERM)


def _decoded(data: bytes, text: bool):
  return io.TextIOWrapper(io.BytesIO(data)).read() if text else data  # universal newlines


def run(args, *, cwd=None, env=None, capture_output=False, text=False, timeout=None,
        stdout=None, stderr=None, check=False, input=None):  # pylint: disable=redefined-builtin
  """subprocess.run for [sys.executable, SCRIPT | -c CODE, *args] (see Popen); the program's
  stdin is /dev/null (no test feeds one; subprocess.run would hand it pytest's)."""
  if input is not None or not _forkable([str(a) for a in args]):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=capture_output, text=text,
                          timeout=timeout, stdout=stdout, stderr=stderr, check=check, input=input)
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    if capture_output:
      stdout, stderr = out, err
    proc = Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    try:
      proc.wait(timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      raise
    captured = []
    for f in (out, err):
      f.seek(0)
      captured.append(_decoded(f.read(), text) if capture_output else None)
  result = subprocess.CompletedProcess(proc.args, proc.returncode, *captured)
  if check:
    result.check_returncode()
  return result


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
  _serve(int(sys.argv[2]))
