"""BraTS post-processing on hand-made label maps: the ET volume rule, small components, tuning the threshold."""

from __future__ import annotations

import numpy as np

from cmfl_jax.metrics import brats_metrics
from cmfl_jax.postprocess import (
    DEFAULT_ET_MIN_MM3,
    et_statistics,
    postprocess,
    remove_small_tumour_components,
    resolve_et_threshold,
    small_et_to_necrosis,
    tune_et_threshold,
)


def tumour_with_speck() -> np.ndarray:
    """Oedema block with a 20-voxel ET speck (2x2x5) inside, as a model predicts it in an LGG-like subject."""
    label = np.zeros((40, 40, 40), np.uint8)
    label[10:30, 10:30, 10:30] = 2
    label[18:20, 18:20, 15:20] = 4
    return label


def test_a_20_voxel_et_speck_becomes_necrosis_and_rescues_the_subject():
    pred = tumour_with_speck()
    truth = np.where(pred == 4, 2, pred).astype(np.uint8)  # the subject has no enhancing tumour
    assert brats_metrics(pred, truth)["ET"]["dice"] == 0.0 and brats_metrics(pred, truth)["ET"]["hd95"] == 373.13
    out = small_et_to_necrosis(pred, (1.0, 1.0, 1.0), et_min_mm3=100.0)
    assert np.count_nonzero(out == 4) == 0
    assert np.count_nonzero(out == 1) == 20 and np.array_equal(out[pred != 4], pred[pred != 4])
    assert brats_metrics(out, truth)["ET"]["dice"] == 1.0 and brats_metrics(out, truth)["ET"]["hd95"] == 0.0
    assert np.count_nonzero(pred == 4) == 20  # the input is not changed


def test_a_large_et_stays_and_the_threshold_is_in_mm3():
    label = tumour_with_speck()
    label[12:22, 12:22, 12:22] = 4  # 1000 voxels of ET (the speck's voxels inside it)
    assert np.array_equal(small_et_to_necrosis(label, (1.0, 1.0, 1.0), 500.0), label)
    speck = tumour_with_speck()  # 20 voxels: 20 mm³ at 1 mm, 160 mm³ at 2 mm
    assert np.count_nonzero(small_et_to_necrosis(speck, (2.0, 2.0, 2.0), 100.0) == 4) == 20
    assert np.count_nonzero(small_et_to_necrosis(speck, (2.0, 2.0, 2.0), 200.0) == 4) == 0
    assert np.count_nonzero(small_et_to_necrosis(speck, (1.0, 1.0, 1.0), 0.0) == 4) == 20  # 0 switches it off


def test_small_tumour_components_are_removed_large_ones_kept():
    label = tumour_with_speck()
    label[35:37, 35:37, 35:37] = 2  # an isolated 8-voxel blob far from the tumour
    out = remove_small_tumour_components(label, (1.0, 1.0, 1.0), wt_min_mm3=50.0)
    assert np.count_nonzero(out[35:37, 35:37, 35:37]) == 0
    assert np.array_equal(out[:32, :32, :32], label[:32, :32, :32])
    assert np.array_equal(remove_small_tumour_components(label, (1.0, 1.0, 1.0), 0.0), label)
    both = postprocess(label, (1.0, 1.0, 1.0), et_min_mm3=100.0, wt_min_mm3=50.0)
    assert np.count_nonzero(both == 4) == 0 and np.count_nonzero(both[35:37, 35:37, 35:37]) == 0


def test_tuning_picks_the_smallest_threshold_with_the_best_mean_et_dice():
    spacing = (1.0, 1.0, 1.0)
    no_et_pred = tumour_with_speck()  # 20 false ET voxels
    no_et_truth = np.where(no_et_pred == 4, 2, no_et_pred).astype(np.uint8)
    et_truth = tumour_with_speck()
    et_truth[12:18, 12:18, 12:18] = 4  # true ET: this 216-voxel cube and the 20-voxel speck
    et_pred = et_truth.copy()  # predicted exactly
    volume = np.count_nonzero(et_pred == 4)
    stats = [et_statistics(no_et_pred, no_et_truth, spacing), et_statistics(et_pred, et_truth, spacing)]
    assert stats == [(20.0, 0.0, True), (float(volume), 1.0, False)]
    best, scores = tune_et_threshold(stats, grid=(0.0, 10.0, 50.0, 200.0, float(volume) + 1))
    # by hand: threshold 0 or 10 keeps the speck (0 + 1) / 2; 50 and 200 drop it (1 + 1) / 2; above the true
    # ET's volume both lose their ET: (1 + 0) / 2
    assert scores == {0.0: 0.5, 10.0: 0.5, 50.0: 1.0, 200.0: 1.0, float(volume) + 1: 0.5}
    assert best == 50.0


def test_the_threshold_applied_is_the_configured_then_the_tuned_then_the_default():
    assert resolve_et_threshold(-1.0, 300.0) == 300.0
    assert resolve_et_threshold(-1.0, None) == DEFAULT_ET_MIN_MM3
    assert resolve_et_threshold(0.0, 300.0) == 0.0  # off
    assert resolve_et_threshold(120.0, 300.0) == 120.0
