"""NCSNv2 on LSUN bedroom 128x128 (annealed Langevin dynamics sampling)."""
from configs.default_lsun_configs import get_default_configs


def get_config():
  """Return the experiment ConfigDict."""
  config = get_default_configs()

  training = config.training
  training.batch_size = 128
  training.sde = 'vesde'
  training.continuous = True  # score_sde set 'continuouse' (a typo), so it stayed True

  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'none'
  sampling.corrector = 'ald'
  sampling.n_steps_each = 3
  sampling.snr = 0.095

  data = config.data
  data.category = 'bedroom'
  data.image_size = 128

  model = config.model
  model.name = 'ncsnv2_128'
  model.scale_by_sigma = True
  model.sigma_max = 190
  model.num_scales = 1086
  model.ema_rate = 0.9999
  model.sigma_min = 0.01
  model.normalization = 'InstanceNorm++'
  model.nonlinearity = 'elu'
  model.nf = 128
  model.interpolation = 'bilinear'

  optim = config.optim
  optim.weight_decay = 0
  optim.optimizer = 'Adam'
  optim.lr = 1e-4
  optim.beta1 = 0.9
  optim.amsgrad = False
  optim.eps = 1e-8
  optim.warmup = 0
  optim.grad_clip = -1

  return config
