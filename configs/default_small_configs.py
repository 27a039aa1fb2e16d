"""Defaults for the small CPU configs (Fashion-MNIST, MNIST-5k, 8x8 digits, toy 2-D data).

Same sections and field names as score_sde's defaults, sized for a few minutes on a laptop CPU.
"""
import ml_collections


def get_default_configs() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.training = training = ml_collections.ConfigDict()
  training.sde = 'vpsde'
  training.continuous = True
  training.reduce_mean = True
  training.likelihood_weighting = False
  training.importance_sampling = False
  training.batch_size = 64
  training.n_iters = 20000
  training.n_jitted_steps = 1  # CPU: see parallel.fused_steps
  training.log_freq = 50
  training.eval_freq = 500
  training.snapshot_freq = 5000
  training.snapshot_freq_for_preemption = 500
  training.keep_checkpoints = 3
  training.max_seconds = None  # stop (and checkpoint) after this much wall time, if set

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = 'deis'
  sampling.num_steps = 10
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.snr = 0.16
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.batch_size = 64
  sampling.num_samples = 64
  sampling.pc_num_steps = 500  # the PC run of main.py --mode all

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.batch_size = 128
  evaluate.enable_bpd = True
  evaluate.bpd_dataset = 'test'
  evaluate.bpd_num_examples = 128
  evaluate.rtol = 1e-4  # ODE tolerances of the likelihood (score_sde: 1e-5; 1e-4 costs ~25 % fewer
  evaluate.atol = 1e-4  # evaluations at ~5e-4 bits/dim, see benchmarks/likelihood.py)
  evaluate.enable_sampling = True
  evaluate.num_samples = 1024
  evaluate.sampler = 'deis'
  evaluate.num_steps = 10
  evaluate.feature_extractor = 'effnet'  # offline; 'inception' (FID) needs eval.inception_weights
  evaluate.inception_weights = ''
  evaluate.reference_examples = 2048

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'FashionMNIST'
  data.image_size = 28
  data.num_channels = 1
  data.centered = True
  data.random_flip = False
  data.uniform_dequantization = False
  data.data_dir = ml_collections.config_dict.placeholder(str)  # None: the default location

  config.model = model = ml_collections.ConfigDict()
  model.name = 'unet_small'
  model.sigma_min = 0.01
  model.sigma_max = 50.
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.
  model.ema_rate = 0.995  # short CPU runs: the EMA forgets the initial weights within ~1000 steps
  model.dropout = 0.0

  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = 'Adam'
  optim.lr = 1e-3
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.weight_decay = 0.
  optim.warmup = 200
  optim.grad_clip = 1.

  # The noise-conditional classifier of --mode train_classifier (a small WRN-10-2 of
  # models/wideresnet.py) and the default weight of --class_label sampling.
  config.classifier = classifier = ml_collections.ConfigDict()
  classifier.num_classes = 10
  classifier.blocks_per_group = 1
  classifier.channel_multiplier = 2
  classifier.n_iters = 2000
  classifier.batch_size = 64
  classifier.lr = 1e-3
  classifier.max_seconds = 300.
  classifier.log_freq = 100
  classifier.snapshot_freq = 200
  classifier.eval_examples = 1000
  classifier.scale = 1.0

  config.seed = 42
  return config
