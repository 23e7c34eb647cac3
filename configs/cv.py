"""Cross-validation of the whole method: for every fold, CMFT and CMFF without it, scored on it; then one summary.

  python -m cmfl_jax.main --config=configs/cv.py --workdir=runs/cv
On the built-in synthetic data by default (``--config.data.root=/data/BraTS2018`` for real data). For each fold k of
``config.data.split.folds`` (by ``config.data.split.seed``): ``<workdir>/fold<k>/`` holds the fold's split
(``split.json``, ``train.csv``, ``validation.csv``), a CMFT run on its training part only (``cmft/``), a CMFF run
from it validated on fold k (``cmff/``), and the out-of-fold scores of CMFF's ``best/`` (``validation.json``).
Then ``<workdir>/cv_summary.md`` and ``.json``: per-fold and mean ± std Dice and HD95 per region, and the ET
post-processing threshold tuned on the pooled out-of-fold predictions. Running the command again skips the
finished folds and resumes a stopped training.

Variants: the default (CPU-sized: the demo's default sizes and steps, 5 folds of its 20 subjects), ``:smoke``
(seconds per fold, for CI: the demo's ``:smoke`` sizes, 2 folds). Stage settings pass through as in the demo:
``--config.cmft.train.steps=300``, ``--config.cmff.val.every=100``, ``--config.model.attention=cbam``,
``--config.data.split.folds=3``. Predict with the fold ensemble (every fold's CMFF ``best/``, the pooled threshold):
  python -m cmfl_jax.main --config=configs/predict.py --workdir=runs/cv_predict --config.model_dir=runs/cv
"""

from __future__ import annotations

import os
import runpy

import ml_collections

VARIANTS = {"default": None, "smoke": "smoke"}  # cv variant -> the variant of configs/demo.py it starts from
NOT_STAGES = ("predict", "evaluate", "export")  # the demo's stages after training: the CV job scores each fold itself


def _demo_config(arg: str | None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the sibling ``configs/demo.py`` (configs/ is a folder of files, not a package)."""
    return runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))["get_config"](arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/cv.py (known: smoke)")
    config = _demo_config(VARIANTS[variant])  # seed, data, model, cmft, cmff as the demo shares them
    config.job = "cv"
    for name in NOT_STAGES:
        del config[name]
    # How each fold's CMFF best/ predicts its held-out subjects (as configs/predict.py does).
    config.oof = ml_collections.ConfigDict({"overlap": 0.5, "batch_size": 1, "mirror": False})
    if variant == "smoke":
        config.data.split.folds = 2  # 4 subjects: 2 held out per fold
        for phase in ("cmft", "cmff"):  # every step a few seconds of CPU; tracing the steps is most of a fold
            config[phase].train.update(steps=4, save_every=4, preview_every=0)
        config.cmff.val.every = 4  # one validation, at the last step
    return config
