"""`import sgm_jax` turns off XLA's CPU YNNPACK fusion, which computes some programs wrong on
jaxlib 0.10.2 (sgm_jax/xla_workarounds.py): the programs it got wrong are right, a flag the user
sets is kept, and a backend started before the import is warned about."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

from sgm_jax import xla_workarounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = xla_workarounds.YNN_FUSION
APPLIES = xla_workarounds.with_workarounds("", importlib.metadata.version("jaxlib")) != ""
needs_the_flag = pytest.mark.skipif(not APPLIES, reason="this jaxlib does not get the flag")

# Two expm1 of different arguments and a reduction in one fusion (4,096 elements), and the sub-VP
# likelihood-weighted DSM loss vmapped over 64 keys: jitted against op-by-op, relative differences.
PROGRAMS = """
import jax, jax.numpy as jnp, numpy as np
from sgm_jax import losses, sde_lib, toy
rs = np.random.RandomState(0)
b, z = rs.rand(4096).astype(np.float32), rs.randn(4096, 2).astype(np.float32)
f = lambda b, z: jnp.expm1(2.0 * b) * jnp.sum(z, axis=-1) / jnp.expm1(b)
fused = float(np.max(np.abs(jax.jit(f)(b, z) / f(b, z) - 1)))
gm = toy.GaussianMixture.create(jnp.array([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]]),
                                jnp.array([0.2, 0.3, 0.25]))
sde = sde_lib.subVPSDE()
x = gm.sample(jax.random.PRNGKey(0), 256)
loss = lambda k: losses.dsm_loss(lambda a, t: 0.8 * gm.score_fn(sde)(a, t), sde, x, k, "g2",
                                 eps=1e-3)
keys = jax.random.split(jax.random.PRNGKey(2), 64)
dsm = float(np.max(np.abs(jax.jit(jax.vmap(loss))(keys) / jax.vmap(loss)(keys) - 1)))
print(fused, dsm)
"""


def _python(code: str, xla_flags: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=300)


def _flags_without_workaround() -> str:
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(FLAG))


@pytest.mark.parametrize("version,added", [
    ("0.10.2", True), ("0.10.1", True), ("0.11.0", True), ("0.12.0.1", True),
    ("0.10.3.dev20261201", True), ("0.10.0", False), ("0.9.2", False), ("0.4.30", False),
    ("0.13.0", False), ("1.0.0", False), ("", False)])
def test_the_flag_is_added_only_for_jaxlib_versions_that_parse_it(version, added):
  flags = "--xla_force_host_platform_device_count=2"
  expected = f"{flags} {FLAG}=" if added else flags
  assert xla_workarounds.with_workarounds(flags, version) == expected
  assert xla_workarounds.with_workarounds("", version) == (f"{FLAG}=" if added else "")


def test_a_flag_the_user_set_is_kept():
  for flags in (f"{FLAG}=", f"{FLAG}=reduce,elementwise", f"--xla_dump_to=/tmp/x {FLAG}=reduce"):
    assert xla_workarounds.with_workarounds(flags, "0.10.2") == flags


@needs_the_flag
def test_importing_sgm_jax_makes_the_fused_programs_right():
  """Without the flag in XLA_FLAGS, `import sgm_jax` (the programs' first import) adds it before
  the backend starts: the jitted programs equal the op-by-op ones (with the fusion on, jaxlib
  0.10.2 gave relative errors 0.73 and 0.70)."""
  result = _python(PROGRAMS, _flags_without_workaround())
  assert result.returncode == 0, result.stderr[-3000:]
  fused, dsm = map(float, result.stdout.split())
  assert fused < 1e-5 and dsm < 1e-5, (fused, dsm)


@needs_the_flag
def test_the_flag_reaches_subprocesses_and_a_late_import_warns():
  code = ("import os, warnings, jax.numpy as jnp\n"
          "jnp.zeros(1).block_until_ready()  # the backend starts before sgm_jax is imported\n"
          "with warnings.catch_warnings(record=True) as caught:\n"
          "  warnings.simplefilter('always')\n"
          "  import sgm_jax\n"
          "print([str(w.message) for w in caught if w.category is RuntimeWarning])\n"
          "print(os.environ['XLA_FLAGS'])\n")
  late = _python(code, _flags_without_workaround())
  assert late.returncode == 0, late.stderr[-3000:]
  messages, flags = late.stdout.splitlines()
  assert "import sgm_jax before the first JAX computation" in messages and FLAG not in flags
  early = _python("import os, sgm_jax; print(os.environ['XLA_FLAGS'])",
                  "--xla_cpu_enable_fast_math=false")
  assert early.returncode == 0, early.stderr[-3000:]
  assert early.stdout.split() == ["--xla_cpu_enable_fast_math=false", f"{FLAG}="]

