"""Defaults shared by the 256x256 experiments (LSUN, CelebA-HQ, FFHQ), as in score_sde."""
import ml_collections
from ml_collections.config_dict import placeholder
from configs.default_cifar10_configs import use_score_sde_protocol


def get_default_configs() -> ml_collections.ConfigDict:
  """Training, sampling, evaluation, data, model and optimizer defaults for LSUN 256x256."""
  config = ml_collections.ConfigDict()

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 64
  training.n_iters = 2400001
  training.snapshot_freq = 50000
  training.log_freq = 50
  training.eval_freq = 100
  training.snapshot_freq_for_preemption = 5000  # extra checkpoints for preemptible machines
  training.snapshot_sampling = True  # draw samples at every snapshot
  training.likelihood_weighting = False
  training.continuous = True
  training.n_jitted_steps = 5
  training.reduce_mean = False

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.variant = 'score_sde'  # pc: score_sde's own loop (sgm_jax/sampling/pc_score_sde.py)
  sampling.probability_flow = False
  sampling.snr = 0.075

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 50
  evaluate.end_ckpt = 96
  evaluate.batch_size = 512
  evaluate.enable_sampling = True
  evaluate.num_samples = 50000
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = 'test'
  evaluate.rtol = 1e-5  # probability-flow ODE tolerances (bits/dim, interpolation): score_sde's
  evaluate.atol = 1e-5
  use_score_sde_protocol(evaluate)

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'LSUN'
  data.image_size = 256
  data.random_flip = True
  data.uniform_dequantization = False
  data.centered = False
  data.num_channels = 3
  # a local copy (dataset 'npz' or 'folder', or tfds' data_dir); None: the default location
  data.data_dir = placeholder(str)

  config.model = model = ml_collections.ConfigDict()
  # How the network computes, not what (neither is part of a workdir's identity): in 'float32'
  # or 'bfloat16' with float32 parameters either way (README "Mixed precision"), and whether
  # activations are recomputed in the backward pass.
  model.dtype = 'float32'
  model.remat = False
  model.sigma_max = 378
  model.sigma_min = 0.01
  model.num_scales = 2000
  model.beta_min = 0.1
  model.beta_max = 20.
  model.dropout = 0.
  model.embedding_type = 'fourier'

  config.optim = optim = ml_collections.ConfigDict()
  optim.weight_decay = 0
  optim.optimizer = 'Adam'
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 5000
  optim.grad_clip = 1.
  # After the warm-up: 'none' (a constant rate, score_sde's), 'cosine' or 'linear' decay to 0 at
  # step training.n_iters.
  optim.decay = 'none'

  config.seed = 42
  return config
