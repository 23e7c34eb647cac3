"""BraTS evaluation: predictions (configs/predict.py) against the labels of a data root.

  python -m cmfl_jax.main --config=configs/evaluate.py --workdir=runs/evaluate \
      --config.data.root=/data/BraTS2018 --config.predictions=runs/predict/predictions
Writes a per-subject CSV, the summary in the paper's table layout (CSV and Markdown) and a box plot.
"""

import ml_collections

from cmfl_jax.config_defaults import data_config
from cmfl_jax.config_variants import apply_variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.job = "evaluate"
    config.data = data_config()  # data.root: labelled subjects ("" -> the built-in synthetic set)
    config.predictions = ""  # folder of <subject_id>.nii.gz in the dataset's label convention
    return apply_variants(config, arg, {}, "evaluate")
