"""Write the train/validation split of a data root once, for every phase to use.

  python -m cmfl_jax.main --config=configs/split.py --workdir=runs/split --config.data.root=/data/BraTS2021 \
      [--config.data.split.folds=5 --config.data.split.fold=0 --config.data.split.seed=0]
Writes ``<workdir>/split.json`` (the root, the settings, the training and validation ids) and the same split as
explicit-layout CSVs (``train.csv``, ``validation.csv``). ``--config.data.split.file=<workdir>/split.json`` then
makes CMFT, CMFF and the demo use exactly those ids; without a file they split the root the same way themselves.
"""

import ml_collections

from cmfl_jax.config_defaults import data_config
from cmfl_jax.config_variants import apply_variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.job = "split"
    config.data = data_config()  # data.split: folds, fold, seed (data.root: "" -> the built-in synthetic set)
    return apply_variants(config, arg, {}, "split")
