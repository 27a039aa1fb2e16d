"""DDPM++ on CIFAR-10 with the sub-VP SDE, continuous time.

Short name used by the design card; the same config as configs/subvp/cifar10_ddpmpp_continuous.py.
"""
from configs.subvp import cifar10_ddpmpp_continuous


def get_config():
  """Return the ConfigDict of configs/subvp/cifar10_ddpmpp_continuous.py."""
  return cifar10_ddpmpp_continuous.get_config()
