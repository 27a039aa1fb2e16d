"""NCSN++ on CelebA-HQ 1024x1024 with the VE SDE.

Standalone in score_sde (no default file). The original also stored a torch device here; the
fields score_sde's JAX training loop needs but this file lacked (training.n_jitted_steps and the
eval.enable_* switches) take the values of the other configs.
"""
import ml_collections
from configs.default_cifar10_configs import use_score_sde_protocol


def get_config():
  """Return the experiment ConfigDict."""
  config = ml_collections.ConfigDict()

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 8
  training.n_iters = 2400001
  training.snapshot_freq = 50000
  training.log_freq = 50
  training.eval_freq = 100
  training.snapshot_freq_for_preemption = 5000
  training.snapshot_sampling = True
  training.sde = 'vesde'
  training.continuous = True
  training.likelihood_weighting = False
  training.reduce_mean = False
  training.n_jitted_steps = 5

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = 'pc'
  sampling.variant = 'score_sde'  # pc: score_sde's own loop (sgm_jax/sampling/pc_score_sde.py)
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.probability_flow = False
  sampling.snr = 0.15
  sampling.n_steps_each = 1
  sampling.noise_removal = True

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.batch_size = 1024
  evaluate.num_samples = 50000
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 96
  evaluate.enable_sampling = True
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = 'test'
  use_score_sde_protocol(evaluate)

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'CelebAHQ'
  data.image_size = 1024
  data.centered = False
  data.random_flip = True
  data.uniform_dequantization = False
  data.num_channels = 3
  data.tfrecords_path = ''  # path to the CelebA-HQ 1024 tfrecords file
  data.data_dir = ml_collections.config_dict.placeholder(str)  # dataset 'npz' or 'folder'

  config.model = model = ml_collections.ConfigDict()
  # How the network computes, not what (neither is part of a workdir's identity): in 'float32'
  # or 'bfloat16' with float32 parameters either way (README "Mixed precision"), and whether
  # activations are recomputed in the backward pass.
  model.dtype = 'float32'
  model.remat = False
  model.name = 'ncsnpp'
  model.scale_by_sigma = True
  model.sigma_max = 1348
  model.num_scales = 2000
  model.ema_rate = 0.9999
  model.sigma_min = 0.01
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 16
  model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
  model.num_res_blocks = 1
  model.attn_resolutions = (16,)
  model.dropout = 0.
  model.resamp_with_conv = True
  model.conditional = True
  model.fir = True
  model.fir_kernel = [1, 3, 3, 1]
  model.skip_rescale = True
  model.resblock_type = 'biggan'
  model.progressive = 'output_skip'
  model.progressive_input = 'input_skip'
  model.progressive_combine = 'sum'
  model.attention_type = 'ddpm'
  model.init_scale = 0.
  model.fourier_scale = 16
  model.conv_size = 3
  model.embedding_type = 'fourier'

  config.optim = optim = ml_collections.ConfigDict()
  optim.weight_decay = 0
  optim.optimizer = 'Adam'
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.amsgrad = False
  optim.eps = 1e-8
  optim.warmup = 5000
  optim.grad_clip = 1.

  config.seed = 42
  return config
