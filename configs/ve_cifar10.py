"""NCSN++ on CIFAR-10 with the VE SDE, continuous time.

Short name used by the design card; the same config as configs/ve/cifar10_ncsnpp_continuous.py.
"""
from configs.ve import cifar10_ncsnpp_continuous


def get_config():
  """Return the ConfigDict of configs/ve/cifar10_ncsnpp_continuous.py."""
  return cifar10_ncsnpp_continuous.get_config()
