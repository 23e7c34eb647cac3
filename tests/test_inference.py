"""Sliding-window prediction, the class/label mapping and the seeded subject split."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax.data.splits import split_subjects
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.sliding_window import (
    gaussian_importance,
    mirrored,
    restrict_to_brain,
    sliding_window,
    window_starts,
)
from cmfl_jax.label_classes import classes_to_labels, labels_to_classes

pytestmark = pytest.mark.device_check  # run by python -m experiments.device_check on the device it checks


def test_window_starts_cover_the_axis_evenly():
    assert window_starts(10, 16, 0.5) == [0]
    assert window_starts(16, 16, 0.5) == [0]
    assert window_starts(32, 16, 0.5) == [0, 8, 16]
    assert window_starts(155, 128, 0.5) == [0, 27]
    starts = window_starts(240, 128, 0.5)
    assert starts[0] == 0 and starts[-1] == 240 - 128 and max(np.diff(starts)) <= 64


def test_gaussian_importance_peaks_in_the_centre():
    g = gaussian_importance((8, 8, 8))
    assert g.shape == (8, 8, 8) and g.max() == pytest.approx(1.0, rel=1e-6) and g.min() > 0
    assert g[3, 3, 3] == g[4, 4, 4] and g[0, 0, 0] < g[2, 2, 2] < g[3, 3, 3]


@pytest.mark.parametrize("shape", [(20, 22, 24), (9, 30, 16), (16, 16, 16)])
@pytest.mark.parametrize("importance", ["gaussian", "constant"])
def test_a_position_dependent_model_is_reconstructed_exactly(shape, importance):
    """A model whose output is a function of its input voxel alone must come back voxel for voxel."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(*shape, 4)).astype(np.float32)
    predict = lambda x: np.concatenate([x[..., :2] * 2.0, np.ones_like(x[..., :1])], axis=-1)
    out = sliding_window(predict, image, (16, 16, 16), overlap=0.5, batch_size=3, importance=importance)
    assert out.shape == (*shape, 3)
    np.testing.assert_allclose(out[..., :2], image[..., :2] * 2.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[..., 2], 1.0, rtol=1e-6)


def test_one_window_covering_the_volume_equals_a_direct_call():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(16, 16, 16, 2)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3)).astype(np.float32)

    def predict(x):  # a model with spatial context: a 3^3 box filter of channel 0
        from scipy import ndimage

        return np.stack([ndimage.convolve(v[..., 0], kernel, mode="constant") for v in x])[..., None]

    direct = predict(image[None])[0]
    np.testing.assert_allclose(sliding_window(predict, image, (16, 16, 16)), direct, rtol=1e-6, atol=1e-6)


def test_mirroring_of_a_flip_equivariant_model_changes_nothing():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 6, 6, 6, 2)), jnp.float32)
    np.testing.assert_allclose(mirrored(lambda y: y * 3.0)(x), x * 3.0, rtol=1e-6)
    # a model that is not flip-equivariant: mirroring averages the 8 flipped versions
    position = lambda y: jnp.broadcast_to(jnp.arange(6.0)[None, :, None, None, None], y.shape)
    np.testing.assert_allclose(mirrored(position)(x), 2.5, rtol=1e-6)


def test_prediction_is_background_outside_the_brain():
    image = np.zeros((4, 4, 4, 4), np.float32)
    image[1:3, 1:3, 1:3, 2] = 1.0
    pred = np.full((4, 4, 4), 2, np.uint8)
    out = restrict_to_brain(pred, image)
    assert out.sum() == 2 * 8 and out[1, 1, 1] == 2 and out[0, 0, 0] == 0


def test_labels_and_classes_round_trip():
    label = np.array([0, 1, 2, 4, 4, 0], np.uint8)
    np.testing.assert_array_equal(labels_to_classes(label), [0, 1, 2, 3, 3, 0])
    np.testing.assert_array_equal(np.asarray(labels_to_classes(jnp.asarray(label))), [0, 1, 2, 3, 3, 0])
    np.testing.assert_array_equal(classes_to_labels(labels_to_classes(label)), label)


def test_split_is_seeded_disjoint_and_independent_of_order():
    ids = [f"s{i:02d}" for i in range(23)]
    folds = [split_subjects(ids, 5, f, seed=0, key=str)[1] for f in range(5)]
    assert sorted(s for fold in folds for s in fold) == ids  # every subject validates in exactly one fold
    assert sorted(len(f) for f in folds) == [4, 4, 5, 5, 5]
    train, val = split_subjects(ids, 5, 2, seed=0, key=str)
    assert not set(train) & set(val) and len(train) + len(val) == 23
    assert split_subjects(ids[::-1], 5, 2, seed=0, key=str)[1] == sorted(val, reverse=True)
    assert split_subjects(ids, 5, 2, seed=1, key=str)[1] != val
    assert split_subjects(ids, 1, 0, seed=0, key=str) == (ids, [])
    with pytest.raises(CMFLError, match=r"config.data.split.fold: must lie in \[0, 4\]"):
        split_subjects(ids, 5, 5, seed=0, key=str)


def test_mirroring_calls_the_plain_function_once_per_flip_with_one_window_batch():
    """Bounded memory: the 8 flips go one at a time through the same function, never stacked in one call."""
    calls = []

    def plain(y):
        calls.append(np.asarray(y).shape)
        return np.asarray(y) * 2.0

    x = np.random.default_rng(3).normal(size=(2, 4, 5, 6, 2)).astype(np.float32)
    np.testing.assert_allclose(mirrored(plain)(x), x * 2.0, rtol=1e-6)
    assert calls == [(2, 4, 5, 6, 2)] * 8
