"""Lesion-wise BraTS metrics: the two official definitions in use since 2023 (numpy + scipy only).

Regions as in :mod:`cmfl_jax.metrics` (0/1/2/4 label maps: WT, TC, ET). A lesion is a 26-connected component.

**The 2023-2024 leaderboards** (the organisers' script, ``rachitsaluja/BraTS-2023-Metrics``:
:func:`leaderboard_lesionwise_metrics`). The ground truth is dilated ``dilation`` times (18-neighbourhood);
ground-truth components in one component of the dilated mask are one lesion. A predicted component that meets
a lesion's own dilation belongs to it (TP); the lesion's Dice and HD95 are those against the union of its
predicted components; a missed lesion scores Dice 0 and HD95 374; a predicted component that meets no lesion
is a false positive (Dice 0, HD95 374). Lesions of at most ``min_mm3`` (volume = voxels x voxel volume) are
left out (a prediction that meets one is no false positive). The case's figure is the mean over the kept
lesions and the false positives; with neither, Dice 1 and HD95 0. The per-lesion HD95 is this project's
(:func:`cmfl_jax.metrics.hd95`, pooled voxel-surface distances); the script's is DeepMind's surfel-area
weighted ``compute_robust_hausdorff``, which differs by up to a few millimetres (docs/metrics.md).

**The current official package, brats-evaluation** (a wrapper around panoptica with ``config_gli.yaml`` and its
siblings: :func:`brats_evaluation_metrics`). Predicted and reference components are matched one to one by
maximum bipartite matching on Dice (pairs of Dice >= 1e-6); per region: the global Dice, HD95 and NSD of the
whole masks, the mean Dice, HD95 and NSD over the matched pairs (``lesionwise_*``), the instance TP, FP, FN
and F1 = TP / (TP + (FP + FN) / 2). Its edge cases are kept: no lesion in either mask gives NaN throughout;
no match gives lesion-wise Dice and NSD 0 and HD95 inf, F1 0; one mask empty gives global Dice and NSD 0,
HD95 373. As the package computes them, the global HD95 and NSD take no voxel spacing (voxel units, NSD
tolerance 0.5 voxel) and the lesion-wise ones do (mm, tolerance the smallest spacing).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from cmfl_jax.metrics import REGIONS, hd95, region_mask, surface_distances

CONNECTIVITY_26 = np.ones((3, 3, 3), bool)
DILATION_18 = ndimage.generate_binary_structure(3, 2)
LEADERBOARD_PENALTY_HD95 = 374.0  # the organisers' script: a missed or false lesion, an empty mask
PACKAGE_PENALTY_HD95 = 373.0  # brats-evaluation's report of an infinite global HD95
# The organisers' (dilation iterations, lesion volume threshold in mm³) per challenge (2023 script). The
# BraTS-GoAT 2024 evaluation scores each case with the parameters of the cohort it comes from (``cohort``).
LEADERBOARD_PARAMETERS: dict[str, tuple[int, float] | None] = {
    "GLI": (3, 50.0), "SSA": (3, 50.0), "MEN": (1, 50.0), "PED": (3, 50.0), "MET": (1, 2.0), "GoAT": None,
}


def leaderboard_parameters(challenge: str = "GLI", cohort: str | None = None) -> tuple[int, float]:
    """(dilation, lesion volume threshold in mm³) of a challenge of :data:`LEADERBOARD_PARAMETERS`."""
    challenge = challenge.removeprefix("BraTS-")
    if challenge not in LEADERBOARD_PARAMETERS:
        raise ValueError(f"unknown challenge {challenge!r} (known: {', '.join(LEADERBOARD_PARAMETERS)})")
    if LEADERBOARD_PARAMETERS[challenge] is None:
        if cohort is None or cohort.removeprefix("BraTS-") == "GoAT":
            raise ValueError("BraTS-GoAT scores a case with its source cohort's parameters: give cohort=GLI|...")
        return leaderboard_parameters(cohort)
    return LEADERBOARD_PARAMETERS[challenge]


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a boolean mask: (labels 1..n in raster order, n)."""
    labels, n = ndimage.label(mask, structure=CONNECTIVITY_26)
    return labels, int(n)


def _box(*masks: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """The bounding box of the union of ``masks`` (not all empty), widened by ``margin`` within the volume."""
    union = np.logical_or.reduce(masks)
    box = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, union.shape[axis])))
    return tuple(box)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float], empty: float) -> float:
    """HD95 of two masks (``empty`` when one is empty), on their bounding box: the same figure, faster."""
    if not a.any() or not b.any():
        return empty
    box = _box(a, b)
    return hd95(a[box], b[box], spacing)


def _leaderboard_region(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float], dilation: int,
                        min_mm3: float) -> dict:
    voxel_mm3 = float(np.prod(spacing))
    pred_cc, _ = components(pred)
    grown, _ = components(ndimage.binary_dilation(target, DILATION_18, iterations=dilation))
    lesions = np.where(target, grown, 0)  # ground-truth components merged by the dilation
    matched: set[int] = set()
    dice, dist, tp, fn = [], [], 0, 0
    for k, box in enumerate(ndimage.find_objects(lesions), start=1):
        if box is None:
            continue
        lesion = lesions == k
        roi = tuple(slice(max(b.start - dilation, 0), b.stop + dilation) for b in box)
        near = ndimage.binary_dilation(lesion[roi], DILATION_18, iterations=dilation)
        hits = np.unique(pred_cc[roi][near])
        hits = hits[hits > 0]
        matched.update(hits.tolist())
        if np.count_nonzero(lesion) * voxel_mm3 <= min_mm3:
            continue  # too small to be scored; its predictions are no false positives
        own = np.isin(pred_cc, hits) if hits.size else np.zeros_like(lesion)
        dice.append(_dice(own, lesion))
        dist.append(_hd95(lesion, own, spacing, LEADERBOARD_PENALTY_HD95))
        tp, fn = tp + int(hits.size > 0), fn + int(hits.size == 0)
    fp = len(set(np.unique(pred_cc[pred_cc > 0]).tolist()) - matched)
    count = len(dice) + fp
    return {
        "lesionwise_dice": float(np.sum(dice) / count) if count else 1.0,
        "lesionwise_hd95": float((np.sum(dist) + fp * LEADERBOARD_PENALTY_HD95) / count) if count else 0.0,
        "num_tp": tp, "num_fp": fp, "num_fn": fn,
    }


def leaderboard_lesionwise_metrics(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                                   challenge: str = "GLI", cohort: str | None = None) -> dict:
    """``{"ET": {"lesionwise_dice", "lesionwise_hd95", "num_tp", "num_fp", "num_fn"}, ...}`` of two 0/1/2/4
    label maps by the 2023-2024 leaderboards' rules with ``challenge``'s parameters (module docstring)."""
    dilation, min_mm3 = leaderboard_parameters(challenge, cohort)
    pred, target = np.asarray(pred), np.asarray(target)
    return {r: _leaderboard_region(region_mask(pred, r), region_mask(target, r), spacing, dilation, min_mm3)
            for r in REGIONS}


def _nsd(a: np.ndarray, b: np.ndarray, spacing: Sequence[float], tolerance: float) -> float:
    """panoptica's (GaNDLF's) normalized surface Dice at ``tolerance``."""
    box = _box(a, b)
    a_to_b, b_to_a = surface_distances(a[box], b[box], spacing), surface_distances(b[box], a[box], spacing)
    tp_a, tp_b = np.sum(a_to_b <= tolerance) / a_to_b.size, np.sum(b_to_a <= tolerance) / b_to_a.size
    fp, fn = np.sum(a_to_b > tolerance) / a_to_b.size, np.sum(b_to_a > tolerance) / b_to_a.size
    return float((tp_a + tp_b) / (tp_a + tp_b + fp + fn + sys.float_info.min))


def match_lesions(ref_cc: np.ndarray, n_ref: int, pred_cc: np.ndarray, n_pred: int) -> list[tuple[int, int]]:
    """(reference, predicted) component pairs of the maximum bipartite matching by Dice (Dice >= 1e-6)."""
    if n_ref == 0 or n_pred == 0:
        return []
    both = (ref_cc > 0) & (pred_cc > 0)
    overlap = np.bincount(ref_cc[both].astype(np.int64) * (n_pred + 1) + pred_cc[both],
                          minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)[1:, 1:]
    sizes_ref = np.bincount(ref_cc.ravel(), minlength=n_ref + 1)[1:]
    sizes_pred = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)[1:]
    dice = 2.0 * overlap / (sizes_ref[:, None] + sizes_pred[None, :])
    cost = np.where(dice >= 1e-6, 1.0 - dice, 1.0 + 1e-6)
    rows, cols = linear_sum_assignment(cost)
    return [(int(i) + 1, int(j) + 1) for i, j in zip(rows, cols, strict=True) if cost[i, j] < 1.0]


def _package_region(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> dict:
    ref_cc, n_ref = components(target)
    pred_cc, n_pred = components(pred)
    pairs = match_lesions(ref_cc, n_ref, pred_cc, n_pred)
    tp = len(pairs)
    fp, fn = n_pred - tp, n_ref - tp
    nan, unit = float("nan"), (1.0, 1.0, 1.0)
    if not pred.any() and not target.any():
        glob = {"global_dsc": nan, "global_hd95": nan, "global_nsd": nan}
    elif not pred.any() or not target.any():
        glob = {"global_dsc": 0.0, "global_hd95": PACKAGE_PENALTY_HD95, "global_nsd": 0.0}
    else:  # as the package computes them: no voxel spacing
        glob = {"global_dsc": _dice(pred, target), "global_hd95": _hd95(target, pred, unit, nan),
                "global_nsd": _nsd(target, pred, unit, 0.5)}
    if tp:
        scores = []
        for r, p in pairs:
            ref, own = ref_cc == r, pred_cc == p
            scores.append((_dice(own, ref), _hd95(ref, own, spacing, nan), _nsd(ref, own, spacing, min(spacing))))
        lesion = dict(zip(("lesionwise_dsc", "lesionwise_hd95", "lesionwise_nsd"),
                          (float(np.average(s)) for s in zip(*scores, strict=True)), strict=True))
        f1 = tp / (tp + 0.5 * fp + 0.5 * fn)
    elif n_ref + n_pred:
        lesion, f1 = {"lesionwise_dsc": 0.0, "lesionwise_hd95": float("inf"), "lesionwise_nsd": 0.0}, 0.0
    else:
        lesion, f1 = {"lesionwise_dsc": nan, "lesionwise_hd95": nan, "lesionwise_nsd": nan}, nan
    return {**glob, **lesion, "tp": tp, "fp": fp, "fn": fn, "f1": f1}


def brats_evaluation_metrics(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
                             ) -> dict:
    """``{"ET": {"global_dsc", "global_hd95", "global_nsd", "lesionwise_dsc", "lesionwise_hd95",
    "lesionwise_nsd", "tp", "fp", "fn", "f1"}, ...}`` of two 0/1/2/4 label maps as brats-evaluation reports
    them (module docstring)."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    spacing = tuple(float(s) for s in spacing)
    return {r: _package_region(region_mask(pred, r), region_mask(target, r), spacing) for r in REGIONS}
