import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402

# Catch accidental broadcasting between (B,) time arrays and (B, ...) images.
jax.config.update("jax_numpy_rank_promotion", "raise")
