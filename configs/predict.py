"""Full-volume prediction to NIfTI from a trained CMFF run.

  python -m cmfl_jax.main --config=configs/predict.py --workdir=runs/predict \
      --config.model_dir=runs/cmff --config.data.root=/data/BraTS2018_validation
Writes ``<workdir>/predictions/<subject>.nii.gz`` (the input's affine and header, the dataset's labels:
ET = 4, or 3 for BraTS 2023+). Subjects need no label map. An empty ``data.root`` predicts the built-in
synthetic data set.

One case from four files, no folder tree or CSV (``case_id`` defaults to the T1 file's name; ``et_label`` is the
value written for enhancing tumour):
  python -m cmfl_jax.main --config=configs/predict.py --workdir=runs/predict --config.model_dir=runs/bundle \
      --config.case=t1.nii.gz,t1ce.nii.gz,t2.nii.gz,flair.nii.gz --config.case_id=patient7
With a bundle (configs/export.py) as ``model_dir``, ``--config.use_stablehlo=true`` runs its exported StableHLO
function (JAX alone, no model code) instead of rebuilding the Flax model. A re-run skips the subjects whose
outputs exist (``--config.overwrite=true`` redoes them). The BraTS post-processing tuned on the CMFF validation fold
is applied by default (``--config.postprocess.et_min_mm3=0`` switches it off).

A fold ensemble: ``--config.model_dir=runs/cv`` (a ``configs/cv.py`` workdir: every fold's CMFF model, the
median of the folds' ET thresholds) or ``--config.model_dir=runs/a,runs/b`` (any CMFF runs or
bundles that predict the same outputs; the mean of their probabilities, then labels once).
"""

import ml_collections

from cmfl_jax.config_defaults import data_config
from cmfl_jax.config_variants import apply_variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.job = "predict"
    # workdir of a CMFF run (configs/cmff.py) or a bundle (configs/export.py); several, comma-separated, or a CV
    # workdir (configs/cv.py): an ensemble, their probabilities averaged
    config.model_dir = ""
    config.checkpoint = "best"  # of a workdir: "best" (highest validation mean Dice) | "final" | "latest"
    config.use_stablehlo = False  # with a bundle: run its StableHLO window function, not the rebuilt Flax model
    config.data = data_config()
    config.data.require_labels = False
    config.case = ""  # "t1,t1ce,t2,flair": four NIfTI files of one case, predicted instead of data.root
    config.case_id = ""  # name of that case's output; "" -> the T1 file's name without extension and _t1 suffix
    # enhancing-tumour value written for config.case with data.label_set=auto (4; 3 for BraTS 2023+ conventions);
    # a model of another label set (brats2024_gli, brats2024_ped) writes its own values
    config.et_label = 4
    config.out_dir = ""  # "" -> <workdir>/predictions
    config.overwrite = False  # False: skip subjects whose outputs (label map, probabilities if saved) exist
    config.overlap = 0.5  # sliding-window overlap
    # the window: "" the run's training patch; "whole" the volume in one window (fewer, larger windows: faster, but
    # the instance norms see other statistics than in training; docs/performance.md); "D,H,W" explicit edges
    config.window = ""
    config.batch_size = 1  # windows per network call (any number with a bundle's symbolic-batch StableHLO)
    config.mirror = False  # test-time mirroring over the 8 flips (8x the time)
    config.save_probabilities = False  # also write <subject>_probabilities.nii.gz (float32, 4 classes)
    config.overlays = False  # also write <workdir>/overlays/<subject>.png: 3 planes, prediction (and label) over FLAIR
    # BraTS post-processing (cmfl_jax.postprocess): ET under et_min_mm3 becomes NCR/NET; -1: the threshold the CMFF
    # validation tuned (kept in the checkpoint and the bundle; for a CV run's ensemble the median of its
    # folds' own), or 500 mm³ when it has none; 0: off.
    config.postprocess = ml_collections.ConfigDict({"et_min_mm3": -1.0, "wt_min_mm3": 0.0})
    return apply_variants(config, arg, {}, "predict")
