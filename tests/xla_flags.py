"""XLA_FLAGS for a subprocess with its own number of CPU devices."""
import os


def with_device_count(devices: int) -> str:
  """The test run's XLA_FLAGS (tests/conftest.py: its faster-compiling fusion code generator)
  with `--xla_force_host_platform_device_count` set to `devices`."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
