"""Fashion-MNIST 28x28 with the tutorial-sized U-Net and the VP SDE: the offline default.

Trains on 2 CPU cores in about 15 minutes (training.max_seconds) and samples with DEIS at 10 NFE.
The IDX files come from the Debian package dataset-fashion-mnist.
"""
from configs.default_small_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.data.dataset = 'FashionMNIST'
  config.model.name = 'unet_small'
  config.model.channels = (32, 64, 128, 256)
  config.model.embed_dim = 256
  config.model.embedding_type = 'positional'  # VP time labels are 999 t
  config.training.max_seconds = 15 * 60.
  return config
