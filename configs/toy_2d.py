"""Toy 2-D data (8 Gaussians on a circle) with the time-conditional MLP."""
from configs.default_small_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.data.dataset = 'toy_gmm2d'
  config.data.image_size = 2  # points in R^2; networks see x of shape (B, 2)
  config.data.num_channels = 0
  config.data.centered = False
  config.model.name = 'mlp'
  config.model.hidden = (128, 128, 128)
  config.model.embedding_type = 'positional'
  config.training.batch_size = 256
  config.training.n_iters = 5000
  config.eval.enable_bpd = False
  return config
