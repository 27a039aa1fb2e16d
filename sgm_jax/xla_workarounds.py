"""XLA flags sgm-jax sets before JAX starts its CPU backend (`import sgm_jax` applies them).

jaxlib 0.10.2 hands fused elementwise-and-reduce programs on the CPU to YNNPACK (`__ynn_fusion`),
which computes some of them wrong: a program holding two `expm1` (or `log`, `log1p`) of different
arguments and a reduction gives one of the two results for both once the arrays hold about 4,096
elements (4,096 and more were wrong, 2,048 and 4,000 right). `jnp.expm1(2 * b) * jnp.sum(z, -1) /
jnp.expm1(b)` for b of shape (4096,) and z (4096, 2) returns `jnp.sum(z, -1)` (relative error up to
0.73), and the sub-VP likelihood-weighted DSM loss vmapped over 64 keys under jit gave 3.5 for 11.6.
The same fusion crashes on other programs of jaxlib 0.10.2 (jax-ml/jax#39257, #40412). With the
fusion off the programs are right, and the main job's training step is faster on this 2-core CPU
(README, "Training throughput"). Only jaxlib versions that know the flag get it: XLA stops at an
unknown flag.

A flag the user already gives in XLA_FLAGS (`--xla_cpu_experimental_ynn_fusion_type=...`) is kept
as given. The flag only takes effect if it is in XLA_FLAGS when JAX creates its CPU backend (the
first computation), so `import sgm_jax` before computing anything with JAX; otherwise a warning
says what to do.
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings

YNN_FUSION = "--xla_cpu_experimental_ynn_fusion_type"
# jaxlib versions that parse the flag: from 0.10.1 (0.10.2 turned the fusion on) up to the last
# minor version checked.
FLAG_KNOWN = ((0, 10, 1), (0, 13, 0))


def _release(version: str) -> tuple[int, ...]:
  parts = []
  for piece in version.split(".")[:3]:
    digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
    if not digits:
      break
    parts.append(int(digits))
  return tuple(parts)


def with_workarounds(xla_flags: str, jaxlib_version: str) -> str:
  """`xla_flags` with YNNPACK fusion turned off, where `jaxlib_version` parses the flag and the
  flags do not already set it."""
  low, high = FLAG_KNOWN
  if YNN_FUSION in xla_flags or not low <= _release(jaxlib_version) < high:
    return xla_flags
  return f"{xla_flags} {YNN_FUSION}=".strip()


def _backend_started() -> bool:
  bridge = sys.modules.get("jax._src.xla_bridge")
  started = getattr(bridge, "backends_are_initialized", None)
  return bool(started is not None and started())


def apply() -> None:
  """Put the workarounds into os.environ["XLA_FLAGS"] (inherited by subprocesses), or warn if
  JAX's backend has already started without them."""
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  wanted = with_workarounds(flags, jaxlib_version)
  if wanted == flags:
    return
  if _backend_started():
    warnings.warn(
        f"JAX started its backend before `import sgm_jax`, with XLA's CPU YNNPACK fusion on, "
        f"which computes some programs wrong on jaxlib {jaxlib_version} "
        f"(sgm_jax/xla_workarounds.py); import sgm_jax before the first JAX computation, or set "
        f"XLA_FLAGS='{YNN_FUSION}=' in the environment", RuntimeWarning, stacklevel=3)
    return
  os.environ["XLA_FLAGS"] = wanted
