"""Scan a data root, validate every subject, build the cache and print a summary table.

  python -m cmfl_jax.main --config=configs/prepare.py --workdir=runs/prepare \
      --config.data.root=/data/BraTS2018/Training
Without a root it generates (once) and prepares the built-in synthetic data set.
"""

import ml_collections

from cmfl_jax.config_defaults import data_config
from cmfl_jax.config_variants import apply_variants


def _smoke(config: ml_collections.ConfigDict) -> None:
    config.data.synthetic.update(n=4, shape=(48, 48, 48))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.job = "prepare"
    config.data = data_config()
    return apply_variants(config, arg, {"smoke": _smoke}, "prepare")
