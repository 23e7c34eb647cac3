"""BraTS post-processing of a predicted 0/1/2/4 label map, as the BraTS winners do it (nnU-Net, "No New-Net").

Under the BraTS rules a subject without enhancing tumour scores ET Dice 0 and HD95 373.13 for a handful of
false ET voxels, which dominates the mean over subjects. So:

* **ET volume threshold**: when the predicted enhancing tumour's total volume is below ``et_min_mm3`` (in
  mm³, so it does not depend on the voxel spacing), every ET voxel becomes NCR/NET (label 1): the tumour
  core is kept, only the enhancement claim is withdrawn;
* **small whole-tumour components** (optional): connected components of the whole tumour (26-connected)
  smaller than ``wt_min_mm3`` become background.

The ET threshold is tuned on the validation fold (:func:`tune_et_threshold`) and carried with the model;
without a validation fold :data:`DEFAULT_ET_MIN_MM3` applies. numpy + scipy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

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


def tune_et_threshold(predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                      spacings: Sequence[Sequence[float]], grid: Sequence[float] = ET_GRID_MM3
                      ) -> tuple[float, dict[float, float]]:
    """The ET threshold of ``grid`` with the highest mean ET Dice over the subjects (ties: the smallest), and
    the mean ET Dice of every threshold. ET volumes are counted once per subject, so the grid is cheap."""
    et_voxels = [int(np.count_nonzero(p == ET)) * voxel_mm3(s) for p, s in zip(predictions, spacings, strict=True)]
    kept_dice = [binary_metrics(region_mask(p, "ET"), region_mask(t, "ET"))["dice"]
                 for p, t in zip(predictions, labels, strict=True)]
    target_empty = [not np.any(t == ET) for t in labels]
    scores = {}
    for threshold in grid:
        # below the threshold ET disappears: Dice 1 if the subject has no ET, else 0
        per_subject = [(1.0 if empty else 0.0) if 0 < volume < threshold else dice
                       for volume, dice, empty in zip(et_voxels, kept_dice, target_empty, strict=True)]
        scores[float(threshold)] = float(np.mean(per_subject))
    best = max(scores, key=lambda t: (scores[t], -t))
    return best, scores
