"""Fashion-MNIST with the score-SDE tutorial's setup: its U-Net (VALID padding) predicting the
noise eps under the VP SDE, score_sde's sigma^2 weighting and uniform t.

Kept as a named option (the default until the few-step model of configs/fashion_mnist.py): it
reproduces the tutorial and score_sde conventions and its predictor-corrector samples are fine,
but its eps error at high noise is amplified 150x in the data estimate, so DEIS / DDIM /
DPM-Solver / ODE samples blow up (see README, "Score networks").
"""
from configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.model.padding = 'VALID'
  config.model.parameterization = None
  config.training.weighting = None
  config.training.time_sampling = 'uniform'
  config.data.uniform_dequantization = False
  config.optim.lr = 1e-3  # the small configs' rate (configs/fashion_mnist.py trains at 2e-3)
  return config
