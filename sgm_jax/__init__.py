"""sgm-jax: score-based generative modeling with SDEs in JAX/Flax.

`sgm_jax.load(workdir)` opens a trained (or imported) workdir: `.score_fn(x, t)`, `.sample(...)`
(see sgm_jax/loading.py).
"""
from sgm_jax import xla_workarounds

xla_workarounds.apply()  # before anything starts JAX's backend

__version__ = "0.1.0"


def load(workdir, checkpoint_step=None, config=None):
  """The model of a workdir of `main.py --mode train` or `--mode import` at its newest (or the
  given) checkpoint: a sgm_jax.loading.Model with .config, .sde, .params (EMA), .step,
  .score_fn(x, t) and .sample(num_samples, sampler="deis", num_steps=10, seed=0, **options)."""
  from sgm_jax import loading  # imported on first use: `import sgm_jax` stays light
  return loading.load(workdir, checkpoint_step, config)
