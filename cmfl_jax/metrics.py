"""BraTS 2017/2018 metrics per region: Dice, sensitivity, specificity and Hausdorff 95.

Regions from the 0/1/2/4 labels: WT = {1, 2, 4}, TC = {1, 4}, ET = {4}. Another label set's regions (RC for
BraTS 2024 GLI post-treatment; NETC, CC, ED for BraTS 2024 PED) come from its table entry,
:attr:`cmfl_jax.label_sets.LabelSet.internal_regions`, passed as ``regions``.

HD95 is computed over surface voxels (mask voxels with a 6-neighbour outside the mask),
in millimetres using the voxel spacing, with scipy's exact Euclidean distance transform.
Symmetric form: the 95th percentile of the *pooled* directed surface distances
(pred -> target and target -> pred), as medpy's ``hd95`` does.

Empty masks follow the BraTS rules: both empty gives Dice 1 and HD95 0; exactly one empty
gives Dice 0 and HD95 = 373.13 mm (the diagonal of the BraTS 240x240x155 grid at 1 mm).
Sensitivity is 1 when the target region is empty (nothing to miss); specificity is over the
whole volume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from cmfl_jax.label_sets import LABEL_SETS

REGIONS = LABEL_SETS["brats2021"].internal_regions  # {"ET": (4,), "WT": (1, 2, 4), "TC": (1, 4)}
EMPTY_HD95 = 373.13
METRIC_NAMES = ("dice", "sensitivity", "specificity", "hd95")


def region_mask(label: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of a BraTS region (ET, WT or TC) in a 0/1/2/4 label map."""
    return np.isin(label, REGIONS[region])


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~eroded


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    surface_a, surface_b = _surface(a), _surface(b)
    distance_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    return distance_to_b[surface_a]


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Symmetric Hausdorff 95 (pooled directed distances) of two boolean masks, with the BraTS empty rules."""
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return EMPTY_HD95
    pooled = np.concatenate([surface_distances(pred, target, spacing), surface_distances(target, pred, spacing)])
    return float(np.percentile(pooled, 95))


def binary_metrics(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict:
    """Dice, sensitivity, specificity and HD95 of two boolean masks."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    tp = int(np.count_nonzero(pred & target))
    fp = int(np.count_nonzero(pred & ~target))
    fn = int(np.count_nonzero(~pred & target))
    tn = pred.size - tp - fp - fn
    both_empty = tp + fp + fn == 0
    return {
        "dice": 1.0 if both_empty else 2.0 * tp / (2 * tp + fp + fn),
        "sensitivity": 1.0 if tp + fn == 0 else tp / (tp + fn),
        "specificity": 1.0 if tn + fp == 0 else tn / (tn + fp),
        "hd95": hd95(pred, target, spacing),
    }


def brats_metrics(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                  regions: Mapping[str, tuple[int, ...]] | None = None) -> dict:
    """``{"ET": {"dice", "sensitivity", "specificity", "hd95"}, "WT": ..., "TC": ...}`` of two internal label
    maps; ``regions``: a label set's internal regions instead of ET, WT, TC."""
    regions = REGIONS if regions is None else regions
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    return {r: binary_metrics(np.isin(pred, v), np.isin(target, v), spacing) for r, v in regions.items()}
