"""BraTS post-processing of a predicted 0/1/2/4 label map, as the BraTS winners do it (nnU-Net, "No New-Net").

Under the BraTS rules a subject without enhancing tumour scores ET Dice 0 and HD95 373.13 for a handful of
false ET voxels, which dominates the mean over subjects. So:

* **ET volume threshold**: when the predicted enhancing tumour's total volume is below ``et_min_mm3`` (in
  mm³, so it does not depend on the voxel spacing), every ET voxel becomes NCR/NET (label 1): the tumour
  core is kept, only the enhancement claim is withdrawn;
* **small whole-tumour components** (optional): connected components of the whole tumour (26-connected)
  smaller than ``wt_min_mm3`` become background.

The ET threshold is tuned on the validation fold (:func:`tune_et_threshold`), on the legacy ET Dice or the
lesion-wise one (``config.val.metric``), and carried with the model;
without a validation fold :data:`DEFAULT_ET_MIN_MM3` applies. numpy + scipy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from cmfl_jax.lesion_metrics import leaderboard_lesionwise_metrics
from cmfl_jax.metrics import binary_metrics, region_mask

DEFAULT_ET_MIN_MM3 = 500.0  # Isensee et al., BraTS 2018 ("No New-Net"): 500 voxels of 1 mm³
ET_GRID_MM3 = (0.0, 50.0, 100.0, 200.0, 300.0, 500.0, 750.0, 1000.0, 1500.0, 2000.0)
NCR, ET = 1, 4


def voxel_mm3(spacing: Sequence[float]) -> float:
    return float(np.prod([float(s) for s in spacing]))


def small_et_to_necrosis(label: np.ndarray, spacing: Sequence[float], et_min_mm3: float) -> np.ndarray:
    """``label`` with every ET voxel relabelled NCR/NET when the ET volume is below ``et_min_mm3`` (a copy)."""
    out = np.array(label, copy=True)
    et = out == ET
    if et.any() and np.count_nonzero(et) * voxel_mm3(spacing) < et_min_mm3:
        out[et] = NCR
    return out


def remove_small_tumour_components(label: np.ndarray, spacing: Sequence[float], wt_min_mm3: float) -> np.ndarray:
    """``label`` with the whole-tumour components (26-connected) smaller than ``wt_min_mm3`` set to 0 (a copy)."""
    out = np.array(label, copy=True)
    if wt_min_mm3 <= 0:
        return out
    components, n = ndimage.label(out > 0, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return out
    sizes = np.bincount(components.ravel())[1:] * voxel_mm3(spacing)
    small = np.flatnonzero(sizes < wt_min_mm3) + 1
    out[np.isin(components, small)] = 0
    return out


def postprocess(label: np.ndarray, spacing: Sequence[float], et_min_mm3: float, wt_min_mm3: float = 0.0
                ) -> np.ndarray:
    """Both rules: small whole-tumour components removed first, then the ET volume threshold."""
    return small_et_to_necrosis(remove_small_tumour_components(label, spacing, wt_min_mm3), spacing, et_min_mm3)


def resolve_et_threshold(configured: float, tuned: float | None) -> float:
    """The ET threshold to apply: ``configured`` when >= 0 (0 switches the rule off), else the model's tuned
    value, else :data:`DEFAULT_ET_MIN_MM3`."""
    if configured >= 0:
        return float(configured)
    return float(tuned) if tuned is not None else DEFAULT_ET_MIN_MM3


def et_statistics(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float], metric: str = "legacy"
                  ) -> tuple[float, float, bool]:
    """What tuning needs of one subject: (predicted ET volume in mm³, ET Dice as predicted, whether a subject
    without predicted ET scores 1). ``metric``: ``legacy``, the volume's Dice (1 without ET in the target), or
    ``lesionwise``, the 2023-2024 leaderboards' lesion-wise Dice (1 without an ET lesion above their threshold)."""
    volume = np.count_nonzero(pred == ET) * voxel_mm3(spacing)
    if metric == "lesionwise":
        dice = leaderboard_lesionwise_metrics(pred, target, spacing)["ET"]["lesionwise_dice"]
        nothing = leaderboard_lesionwise_metrics(np.zeros_like(pred), target, spacing)["ET"]["lesionwise_dice"]
        return float(volume), float(dice), nothing == 1.0
    dice = binary_metrics(region_mask(pred, "ET"), region_mask(target, "ET"))["dice"]
    return float(volume), float(dice), not bool(np.any(target == ET))


def tune_et_threshold(stats: Sequence[tuple[float, float, bool]], grid: Sequence[float] = ET_GRID_MM3
                      ) -> tuple[float, dict[float, float]]:
    """The threshold of ``grid`` with the highest mean ET Dice over the subjects' :func:`et_statistics` (ties:
    the smallest), and the mean ET Dice of every threshold. Below the threshold a subject's ET disappears: Dice
    1 if it has no ET, else 0; so no volume is kept in memory."""
    scores = {}
    for threshold in grid:
        per_subject = [(1.0 if empty else 0.0) if 0 < volume < threshold else dice for volume, dice, empty in stats]
        scores[float(threshold)] = float(np.mean(per_subject))
    best = max(scores, key=lambda t: (scores[t], -t))
    return best, scores
