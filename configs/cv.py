"""Cross-validation of the whole method: for every fold, CMFT and CMFF without it, scored on it; then one summary.

  python -m cmfl_jax.main --config=configs/cv.py --workdir=runs/cv
On the built-in synthetic data by default (``--config.data.root=/data/BraTS2018`` for real data). For each fold k of
``config.data.split.folds`` (by ``config.data.split.seed``): ``<workdir>/fold<k>/`` holds the fold's split
(``split.json``, ``train.csv``, ``validation.csv``), the split of its training subjects into training and
selection (``select/``, ``config.oof.inner_folds``), a CMFT run on the training part (``cmft/``), a CMFF run from it
validated on the selection part (``cmff/``: picks ``best/``, tunes the ET threshold), and the out-of-fold scores
of that model on fold k, as predicted and post-processed (``validation.json``, ``predictions/``): nothing is
chosen on a scored subject. Then ``<workdir>/cv_summary.md`` and ``.json``: per-fold and mean ± std Dice and HD95
per region. Running the command again skips the finished folds and resumes a stopped training.

Variants: the default (CPU-sized: the demo's default sizes and steps, 5 folds of its 20 subjects), ``:smoke``
(seconds per fold, for CI: the demo's ``:smoke`` sizes, 2 folds). Stage settings pass through as in the demo:
``--config.cmft.train.steps=300``, ``--config.cmff.val.every=100``, ``--config.model.attention=cbam``,
``--config.data.split.folds=3``. Predict with the fold ensemble (every fold's CMFF, their median threshold):
  python -m cmfl_jax.main --config=configs/predict.py --workdir=runs/cv_predict --config.model_dir=runs/cv
"""

from __future__ import annotations

import ml_collections

from cmfl_jax.config_variants import apply_variants, load_config, sibling, split_parts

SIZES = {"default": "", "smoke": "smoke"}  # cv size -> the size of configs/demo.py it starts from
NOT_STAGES = ("predict", "evaluate", "export")  # the demo's stages after training: the CV job scores each fold itself


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = split_parts(arg)
    sizes = [part for part in parts if part in SIZES]
    variant = sizes[-1] if sizes else "default"
    # seed, data, model, cmft, cmff as the demo shares them
    config = load_config(f"{sibling(__file__, 'demo')}:{SIZES[variant]}")
    config.job = "cv"
    for name in NOT_STAGES:
        del config[name]
    # How each fold's model is chosen and predicts its held-out subjects (as configs/predict.py does). Nothing is
    # chosen on them: fold 0 of inner_folds of the fold's training subjects is CMFF's validation, which picks best/
    # and tunes an ET threshold; inner_folds <= 1: CMFF trains on them all and final/ is scored. Post-processing
    # (cmfl_jax.postprocess) as predict's: et_min_mm3 >= 0 fixed (0: off), -1 the tuned one (500 mm³ without);
    # tumour components under wt_min_mm3 removed.
    config.oof = ml_collections.ConfigDict({"overlap": 0.5, "batch_size": 1, "mirror": False, "inner_folds": 4,
                                           "et_min_mm3": -1.0, "wt_min_mm3": 0.0})
    if variant == "smoke":
        config.data.split.folds = 2  # 4 subjects: 2 held out per fold
        config.oof.inner_folds = 2  # of a fold's 2 training subjects, 1 trains and 1 selects
        for phase in ("cmft", "cmff"):  # every step a few seconds of CPU; tracing the steps is most of a fold
            config[phase].train.update(steps=4, save_every=4, preview_every=0)
        config.cmff.val.every = 4  # one validation, at the last step
    return apply_variants(config, ",".join(p for p in parts if p not in SIZES), {}, "cv")
