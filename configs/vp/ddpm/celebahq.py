"""Reproduces DDPM on CelebA-HQ 256x256: VP SDE, discrete steps."""
from configs.default_lsun_configs import get_default_configs


def get_config():
  """Return the experiment ConfigDict."""
  config = get_default_configs()

  training = config.training
  training.sde = 'vpsde'
  training.continuous = False
  training.reduce_mean = True

  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'ancestral_sampling'
  sampling.corrector = 'none'

  data = config.data
  data.dataset = 'CelebAHQ'
  data.centered = True
  data.tfrecords_path = ''  # path to the CelebA-HQ 256 tfrecords file
  data.image_size = 256

  model = config.model
  model.name = 'ddpm'
  model.scale_by_sigma = False
  model.num_scales = 1000
  model.ema_rate = 0.9999
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 128
  model.ch_mult = (1, 1, 2, 2, 4, 4)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.conditional = True

  optim = config.optim
  optim.lr = 2e-5

  return config
