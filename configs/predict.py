"""Full-volume prediction to NIfTI from a trained CMFF run.

  python -m cmfl_jax.main --config=configs/predict.py --workdir=runs/predict \
      --config.model_dir=runs/cmff --config.data.root=/data/BraTS2018_validation
Writes ``<workdir>/predictions/<subject>.nii.gz`` (the input's affine and header, the dataset's labels:
ET = 4, or 3 for BraTS 2023+). Subjects need no label map. An empty ``data.root`` predicts the built-in
synthetic data set.
"""

import ml_collections

from cmfl_jax.config_defaults import data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.job = "predict"
    config.model_dir = ""  # workdir of a CMFF run (configs/cmff.py), or a bundle from configs/export.py
    config.checkpoint = "best"  # of a workdir: "best" (highest validation mean Dice) | "final" | "latest"
    config.data = data_config()
    config.data.require_labels = False
    config.out_dir = ""  # "" -> <workdir>/predictions
    config.overlap = 0.5  # sliding-window overlap; the window is the run's training patch size
    config.batch_size = 1  # windows per network call
    config.mirror = False  # test-time mirroring over the 8 flips (8x the time)
    config.save_probabilities = False  # also write <subject>_probabilities.nii.gz (float32, 4 classes)
    config.overlays = False  # also write <workdir>/overlays/<subject>.png: 3 planes, prediction (and label) over FLAIR
    if arg:
        raise ValueError(f"unknown variant {arg!r} of configs/predict.py (none defined)")
    return config
