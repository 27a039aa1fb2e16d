"""DDPM++ on CIFAR-10 with the VP SDE, continuous time.

Short name used by the design card; the same config as configs/vp/cifar10_ddpmpp_continuous.py.
"""
from configs.vp import cifar10_ddpmpp_continuous


def get_config():
  """Return the ConfigDict of configs/vp/cifar10_ddpmpp_continuous.py."""
  return cifar10_ddpmpp_continuous.get_config()
