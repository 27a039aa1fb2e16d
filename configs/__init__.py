"""score_sde-compatible ml_collections configs: `get_config()` in every file.

Layout mirrors yang-song/score_sde: `default_*_configs.py` per dataset and one file per
experiment under ve/, vp/ and subvp/; `vp_cifar10.py`, `ve_cifar10.py` and `subvp_cifar10.py`
are short names for the paper's main CIFAR-10 runs. Load with
`ml_collections.config_flags.DEFINE_config_file` from the repository root.
"""
