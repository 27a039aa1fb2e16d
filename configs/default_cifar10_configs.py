"""Defaults shared by the CIFAR-10 experiments (32x32x3), as in score_sde."""
import ml_collections
from ml_collections.config_dict import placeholder


def get_default_configs() -> ml_collections.ConfigDict:
  """Training, sampling, evaluation, data, model and optimizer defaults for CIFAR-10."""
  config = ml_collections.ConfigDict()

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128
  training.n_iters = 1300001
  training.snapshot_freq = 50000
  training.log_freq = 50
  training.eval_freq = 100
  training.snapshot_freq_for_preemption = 10000  # extra checkpoints for preemptible machines
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
  sampling.snr = 0.16

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 9
  evaluate.end_ckpt = 26
  evaluate.batch_size = 1024
  evaluate.enable_sampling = False
  evaluate.num_samples = 50000
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = 'test'
  evaluate.rtol = 1e-5  # probability-flow ODE tolerances (bits/dim, interpolation): score_sde's
  evaluate.atol = 1e-5
  use_score_sde_protocol(evaluate)

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'CIFAR10'
  data.image_size = 32
  data.random_flip = True
  data.centered = False
  data.uniform_dequantization = False
  data.num_channels = 3
  # a local copy (dataset 'npz' or 'folder', or tfds' data_dir); None: the default location
  data.data_dir = placeholder(str)

  config.model = model = ml_collections.ConfigDict()
  # How the network computes, not what (neither is part of a workdir's identity): in 'float32'
  # or 'bfloat16' with float32 parameters either way (README "Mixed precision"), and whether
  # activations are recomputed in the backward pass.
  model.dtype = 'float32'
  model.remat = False
  model.sigma_min = 0.01
  model.sigma_max = 50
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.
  model.dropout = 0.1
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

  # score_sde's noise-conditional classifier (WRN-28-10) of --mode sample --class_label: imported
  # (--mode import --classifier) or trained here (--mode train_classifier); the WRN sizes must be
  # the checkpoint's. checkpoint: an original classifier file used without importing it.
  config.classifier = classifier = ml_collections.ConfigDict()
  classifier.num_classes = 10
  classifier.blocks_per_group = 4
  classifier.channel_multiplier = 10
  classifier.scale = 1.0
  classifier.checkpoint = placeholder(str)
  classifier.n_iters = 2000
  classifier.batch_size = 64
  classifier.lr = 1e-3
  classifier.max_seconds = placeholder(float)
  classifier.log_freq = 100
  classifier.snapshot_freq = 200
  classifier.eval_examples = 1000

  config.seed = 42
  return config


def use_score_sde_protocol(evaluate: ml_collections.ConfigDict) -> None:
  """Set config.eval to score_sde's protocol (sgm_jax/cli/evaluate.py, PROTOCOL_DEFAULTS); shared by
  the CIFAR-10, CelebA, LSUN, CelebA-HQ and FFHQ configs."""
  evaluate.protocol = 'score_sde'  # uint8 samples, FID Inception, whole training split
  # None: the protocol's value; set one (e.g. on the command line) to replace it
  evaluate.feature_extractor = placeholder(str)  # 'inception': needs eval.inception_weights
  evaluate.inception_weights = ''
  evaluate.reference_statistics = ''  # a published statistics file instead of the training split
  evaluate.reference_examples = placeholder(int)  # 0: the whole training split
  evaluate.quantize_samples = placeholder(bool)
  evaluate.inception_score_splits = placeholder(int)
  evaluate.sampler = placeholder(str)  # score_sde: sampling.method
  evaluate.num_steps = placeholder(int)  # score_sde: model.num_scales
