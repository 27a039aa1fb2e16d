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
  # 'sigma2' (score_sde: the eps-MSE), 'g2' (likelihood weighting; also set by
  # likelihood_weighting) or 'output' (the MSE of the network's own output, see
  # model.parameterization); None: from likelihood_weighting.
  training.weighting = ml_collections.config_dict.placeholder(str)
  training.importance_sampling = False
  # 'uniform' t (score_sde) or 'log_normal' (EDM: ln(sigma / alpha) ~ N(-1.2, 1.2^2), DSM only)
  training.time_sampling = 'uniform'
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
  # time_grid=tuned (what --nfe 3-26 uses): the grid fitted to the checkpoint, by Nelder-Mead
  # over tune_max_evals candidates on tune_warmup prior draws of key tune_seed
  # (sgm_jax/cli/tuned_grid.py)
  sampling.tune_warmup = 128
  sampling.tune_max_evals = 100
  sampling.tune_seed = 1
  # Every sampler run from this config sees score_scale * score (None: 1, the score unchanged);
  # > 1 cleans the samples of an under-fitted network of high-frequency residue (README "Score
  # scaling").
  sampling.score_scale = ml_collections.config_dict.placeholder(float)

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.batch_size = 128
  evaluate.enable_loss = True  # the training loss on test images (without dropout)
  evaluate.loss_num_examples = 2048
  evaluate.enable_bpd = True
  evaluate.bpd_dataset = 'test'
  evaluate.bpd_num_examples = 128
  evaluate.rtol = 1e-4  # ODE tolerances of the likelihood (score_sde: 1e-5; 1e-4 costs ~25 % fewer
  evaluate.atol = 1e-4  # evaluations at ~5e-4 bits/dim, see benchmarks/likelihood.py)
  evaluate.enable_denoising_error = True  # eval/denoising_error.png (evaluation/denoising.py)
  evaluate.denoising_examples = 256
  evaluate.denoising_reference = 2048  # training images whose posterior mean is the reference
  evaluate.denoising_levels = 16
  evaluate.enable_sampling = True
  evaluate.num_samples = 1024
  evaluate.sampler = 'deis'
  evaluate.num_steps = 10
  # 'domain': FD-Domain, precision and recall in the features of a CNN classifier trained on the
  # dataset's training split (once, cached; sgm_jax/evaluation/domain.py) against its test split;
  # 'effnet': FD-EffNet (offline ImageNet EfficientNet-Lite0) against the training split;
  # 'inception': FID, needs eval.inception_weights.
  evaluate.feature_extractor = 'domain'
  evaluate.inception_weights = ''
  # Images of the reference split, 0: all (Fashion-MNIST's 10,000 test images take a second with
  # 'domain'; with 'effnet' set a count: its 60,000 training images would take hours on a CPU).
  evaluate.reference_examples = 0

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'FashionMNIST'
  data.image_size = 28
  data.num_channels = 1
  data.centered = True
  data.random_flip = False
  data.uniform_dequantization = False
  data.data_dir = ml_collections.config_dict.placeholder(str)  # None: the default location

  config.model = model = ml_collections.ConfigDict()
  # How the network computes, not what (neither is part of a workdir's identity): in 'float32'
  # or 'bfloat16' with float32 parameters either way (README "Mixed precision"), and whether
  # activations are recomputed in the backward pass.
  model.dtype = 'float32'
  model.remat = False
  model.name = 'unet_small'
  model.sigma_min = 0.01
  model.sigma_max = 50.
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.
  model.ema_rate = 0.995  # short CPU runs: the EMA forgets the initial weights within ~1000 steps
  model.dropout = 0.0
  # What the network outputs (sgm_jax/score.py): None keeps the SDE's own ('eps' for VP, 'score'
  # for VE), as the original checkpoints; 'x0', 'v' or 'edm' (EDM preconditioning with data std
  # sigma_data) for networks that few-step ODE samplers can use.
  model.parameterization = ml_collections.config_dict.placeholder(str)
  model.sigma_data = 0.5

  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = 'Adam'
  optim.lr = 1e-3
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.weight_decay = 0.
  optim.warmup = 200
  optim.grad_clip = 1.
  # After the warm-up: 'none' (a constant rate, score_sde's), 'cosine' or 'linear' decay to 0 at
  # step training.n_iters.
  optim.decay = 'none'

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


def use_few_step_parameterization(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The image configs' default: EDM preconditioning (model.parameterization 'edm', data std 0.5)
  trained on the MSE of the network output with EDM's log-normal noise levels, a model that
  few-step probability-flow ODE samplers (DEIS, DPM-Solver, DDIM) can use; see README."""
  config.model.parameterization = 'edm'
  config.model.sigma_data = 0.5
  config.training.weighting = 'output'
  config.training.time_sampling = 'log_normal'
  return config
