"""BraTS metrics on hand-made masks, and HD95 against a brute-force computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cmfl_jax.metrics import EMPTY_HD95, _surface, binary_metrics, brats_metrics, hd95


def cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def brute_force_hd95(a, b, spacing):
    pa = np.argwhere(_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(_surface(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_known_dice_sensitivity_specificity():
    target = cube((10, 10, 10), (0, 0, 0), (4, 5, 5))  # 100 voxels
    pred = cube((10, 10, 10), (2, 0, 0), (6, 5, 5))  # 100 voxels, 50 shared
    m = binary_metrics(pred, target)
    assert m["dice"] == pytest.approx(0.5)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(850 / 900)


def test_hd95_of_offset_cubes_with_anisotropic_spacing():
    shape = (12, 12, 12)
    a = cube(shape, (2, 2, 2), (8, 8, 8))
    b = cube(shape, (4, 2, 2), (10, 8, 8))  # shifted by 2 voxels along axis 0
    spacing = (2.5, 1.0, 0.5)
    expected = brute_force_hd95(a, b, spacing)
    assert hd95(a, b, spacing) == pytest.approx(expected)
    # Every surface voxel moved by 2 voxels = 5 mm along axis 0 or less: the 95th percentile is 5 mm.
    assert hd95(a, b, spacing) == pytest.approx(5.0)
    assert hd95(a, b, (1, 1, 1)) == pytest.approx(2.0)


@pytest.mark.parametrize("seed", range(5))
def test_hd95_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    a = rng.random((9, 10, 11)) > 0.7
    b = rng.random((9, 10, 11)) > 0.6
    spacing = (1.0, 1.5, 0.7)
    assert hd95(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing))


def test_empty_mask_rules():
    empty = np.zeros((5, 5, 5), bool)
    full = cube((5, 5, 5), (1, 1, 1), (3, 3, 3))
    both = binary_metrics(empty, empty)
    assert both["dice"] == 1.0 and both["hd95"] == 0.0 and both["sensitivity"] == 1.0
    one = binary_metrics(full, empty)
    assert one["dice"] == 0.0 and one["hd95"] == EMPTY_HD95
    other = binary_metrics(empty, full)
    assert other["dice"] == 0.0 and other["hd95"] == EMPTY_HD95 and other["sensitivity"] == 0.0


def test_brats_regions():
    target = np.zeros((8, 8, 8), np.uint8)
    target[2:6, 2:6, 2:6] = 2
    target[3:5, 3:5, 3:5] = 4
    target[3, 3, 3] = 1
    pred = target.copy()
    pred[pred == 4] = 1  # ET predicted as NCR: TC and WT perfect, ET missed
    m = brats_metrics(pred, target)
    assert m["WT"]["dice"] == 1.0 and m["TC"]["dice"] == 1.0
    assert m["ET"]["dice"] == 0.0 and m["ET"]["hd95"] == EMPTY_HD95
    assert set(itertools.chain.from_iterable(v.keys() for v in m.values())) == {
        "dice", "sensitivity", "specificity", "hd95"}
