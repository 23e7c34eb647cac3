"""Lesion-wise metrics on hand-built volumes: every expected figure is worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmfl_jax.lesion_metrics import (
    brats_evaluation_metrics,
    components,
    leaderboard_lesionwise_metrics,
    leaderboard_parameters,
    match_lesions,
)
from cmfl_jax.metrics import brats_metrics, hd95

ET = 4


def volume(*boxes, shape=(24, 20, 20)):
    """A 0/1/2/4 label map with ET (4) in each box: ET = TC = WT."""
    out = np.zeros(shape, np.uint8)
    for box in boxes:
        out[box] = ET
    return out


A = (slice(2, 6), slice(2, 6), slice(2, 6))  # 4x4x4 = 64 voxels
FAR = (slice(16, 20), slice(14, 18), slice(14, 18))  # 64 voxels, beyond any dilation of A
SMALL = (slice(17, 20), slice(15, 18), slice(15, 18))  # 3x3x3 = 27 voxels: 27 mm³ <= 50 at 1 mm
NEAR = (slice(10, 14), slice(2, 6), slice(2, 6))  # 64 voxels, 4 voxels from A: one lesion after 3 dilations


def ranked(pred, target, spacing=(1.0, 1.0, 1.0), challenge="GLI"):
    return leaderboard_lesionwise_metrics(pred, target, spacing, challenge)["ET"]


def package(pred, target, spacing=(1.0, 1.0, 1.0)):
    return brats_evaluation_metrics(pred, target, spacing)["ET"]


def test_two_lesions_one_missed():
    target, pred = volume(A, FAR), volume(A)
    r = ranked(pred, target)
    # A: Dice 1, HD95 0; FAR missed: Dice 0, HD95 374; the mean over the 2 lesions.
    assert (r["lesionwise_dice"], r["lesionwise_hd95"]) == (0.5, 187.0)
    assert (r["num_tp"], r["num_fp"], r["num_fn"]) == (1, 0, 1)
    p = package(pred, target)
    # one match (A, Dice 1, HD95 0); F1 = 1 / (1 + (0 + 1) / 2); global Dice = 2 * 64 / (64 + 128)
    assert (p["tp"], p["fp"], p["fn"]) == (1, 0, 1)
    assert (p["lesionwise_dsc"], p["lesionwise_hd95"], p["lesionwise_nsd"]) == (1.0, 0.0, 1.0)
    assert p["f1"] == pytest.approx(2 / 3) and p["global_dsc"] == pytest.approx(2 / 3)


def test_a_false_lesion():
    target, pred = volume(A), volume(A, FAR)
    r = ranked(pred, target)
    # A: Dice 1, HD95 0; the false lesion: Dice 0, HD95 374; the mean over 1 lesion + 1 false positive.
    assert (r["lesionwise_dice"], r["lesionwise_hd95"]) == (0.5, 187.0)
    assert (r["num_tp"], r["num_fp"], r["num_fn"]) == (1, 1, 0)
    p = package(pred, target)
    assert (p["tp"], p["fp"], p["fn"], p["lesionwise_dsc"]) == (1, 1, 0, 1.0)
    assert p["f1"] == pytest.approx(2 / 3)


def test_a_lesion_under_the_volume_threshold_is_left_out():
    target = volume(A, SMALL)
    r = ranked(volume(A), target)  # SMALL missed, but 27 mm³ <= 50 mm³: not scored
    assert (r["lesionwise_dice"], r["lesionwise_hd95"], r["num_fn"]) == (1.0, 0.0, 0)
    r = ranked(volume(A, SMALL), target)  # found: no false positive either
    assert (r["lesionwise_dice"], r["num_tp"], r["num_fp"]) == (1.0, 1, 0)
    # voxels of 2 mm³: SMALL is 54 mm³ > 50 and counts; missed, it halves the Dice
    r = ranked(volume(A), target, spacing=(2.0, 1.0, 1.0))
    assert (r["lesionwise_dice"], r["lesionwise_hd95"], r["num_fn"]) == (0.5, 187.0, 1)
    assert package(volume(A), target)["fn"] == 1  # the package has no volume threshold


def test_lesions_merged_by_the_dilation():
    target, pred = volume(A, NEAR), volume(A)
    # BraTS-GLI dilates 3 times: A and NEAR (4 voxels apart) are one lesion of 128 voxels, which A meets:
    # Dice = 2 * 64 / (64 + 128) = 2/3, one TP, no FN; its HD95 is the one of A against A + NEAR.
    r = ranked(pred, target)
    assert r["lesionwise_dice"] == pytest.approx(2 / 3) and (r["num_tp"], r["num_fn"]) == (1, 0)
    assert r["lesionwise_hd95"] == pytest.approx(hd95(pred == ET, target == ET))
    # BraTS-MEN dilates once: two lesions, NEAR missed: (1 + 0) / 2 and (0 + 374) / 2
    r = ranked(pred, target, challenge="MEN")
    assert (r["lesionwise_dice"], r["lesionwise_hd95"], r["num_tp"], r["num_fn"]) == (0.5, 187.0, 1, 1)


def test_a_prediction_within_the_dilation_belongs_to_the_lesion_without_touching_it():
    target, pred = volume(A), volume((slice(7, 11), slice(2, 6), slice(2, 6)))  # 1 voxel of gap
    r = ranked(pred, target)
    assert (r["lesionwise_dice"], r["num_tp"], r["num_fp"], r["num_fn"]) == (0.0, 1, 0, 0)
    assert r["lesionwise_hd95"] == pytest.approx(hd95(pred == ET, target == ET)) and r["lesionwise_hd95"] < 10
    p = package(pred, target)  # no overlap, no match: lesion-wise Dice 0, HD95 inf, F1 0
    assert (p["tp"], p["fp"], p["fn"], p["lesionwise_dsc"], p["f1"]) == (0, 1, 1, 0.0, 0.0)
    assert math.isinf(p["lesionwise_hd95"])


def test_empty_masks_follow_each_definition():
    empty = volume()
    r = ranked(empty, empty)  # nothing to score: Dice 1, HD95 0
    assert (r["lesionwise_dice"], r["lesionwise_hd95"]) == (1.0, 0.0)
    assert all(math.isnan(v) for k, v in package(empty, empty).items() if k not in ("tp", "fp", "fn"))
    r = ranked(empty, volume(A))
    assert (r["lesionwise_dice"], r["lesionwise_hd95"], r["num_fn"]) == (0.0, 374.0, 1)
    p = package(empty, volume(A))
    assert (p["global_dsc"], p["global_hd95"], p["lesionwise_dsc"], p["f1"], p["fn"]) == (0.0, 373.0, 0.0, 0.0, 1)


def test_bipartite_matching_gives_each_prediction_to_one_lesion():
    # one predicted component (144 voxels) covering A (64) and 16 voxels of NEAR (64): Dice with A
    # = 2 * 64 / (64 + 144), with NEAR = 2 * 16 / (64 + 144): matched to A, NEAR is a false negative
    pred = volume((slice(2, 11), slice(2, 6), slice(2, 6)))
    ref_cc, n_ref = components(volume(A, NEAR) == ET)
    pred_cc, n_pred = components(pred == ET)
    assert match_lesions(ref_cc, n_ref, pred_cc, n_pred) == [(1, 1)]
    p = package(pred, volume(A, NEAR))
    assert p["lesionwise_dsc"] == pytest.approx(2 * 64 / (64 + 144)) and (p["tp"], p["fn"]) == (1, 1)


def test_challenge_table_and_the_legacy_metrics_unchanged():
    assert leaderboard_parameters("BraTS-MET") == (1, 2.0) and leaderboard_parameters("PED") == (3, 50.0)
    assert leaderboard_parameters("GoAT", cohort="MEN") == (1, 50.0)
    with pytest.raises(ValueError, match="cohort"):
        leaderboard_parameters("GoAT")
    with pytest.raises(ValueError, match="unknown challenge"):
        leaderboard_parameters("XYZ")
    legacy = brats_metrics(volume(A), volume(A, FAR))["ET"]
    assert set(legacy) == {"dice", "sensitivity", "specificity", "hd95"} and legacy["dice"] == pytest.approx(2 / 3)
