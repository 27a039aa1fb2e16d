"""scikit-learn's 8x8 digits with the MLP-Mixer (patch 4): seconds per hundred steps on a CPU."""
from configs.default_small_configs import get_default_configs, use_few_step_parameterization


def get_config():
  config = get_default_configs()
  config.data.dataset = 'digits'
  config.data.image_size = 8
  config.model.name = 'mixer'
  config.model.patch_size = 4
  config.model.hidden_size = 64
  config.model.mix_patch_size = 512
  config.model.mix_hidden_size = 512
  config.model.num_blocks = 4
  config.model.embedding_type = 'positional'
  config.training.n_iters = 5000
  # The splits hold 1,618 training and 179 test images.
  config.eval.bpd_num_examples = 179
  config.eval.denoising_examples = 179
  config.eval.denoising_reference = 1618
  use_few_step_parameterization(config)
  return config
