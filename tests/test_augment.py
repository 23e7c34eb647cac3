"""Training-patch augmentation (``config.data.augment``): off is today's stream bit for bit, on is a function of
seed and step that resumes, the transforms do what they say, and bad settings name their key."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from cmfl_jax.config_defaults import data_config
from cmfl_jax.data.augment import PRESETS, Augment, affine_matrix, apply_voxelwise, resolve_augment, turned_patch
from cmfl_jax.data.cache import build_cache
from cmfl_jax.data.layouts import discover
from cmfl_jax.data.pipeline import PatchSampler, crop_centered, patch_dataset
from cmfl_jax.errors import CMFLError
from cmfl_jax.training import loop

from .conftest import tiny_label, write_tiny_dataset
from .test_pipeline import take

ALL_ON = {name: 1.0 for name in PRESETS["nnunet"]}
HALF_ON = {name: 0.5 for name in PRESETS["nnunet"]}
# Seed 1, tumour_prob 0.5, batch 2: (subject, centre) of the first 4 batches, from the code before augmentation.
RECORDED = [(1, 9, 7, 11), (0, 13, 14, 17), (2, 6, 13, 15), (2, 14, 9, 6), (1, 4, 5, 22), (0, 6, 17, 18),
            (2, 12, 12, 15), (1, 7, 11, 22)]


@pytest.fixture
def subjects(tmp_path):
    """Three tiny cached subjects (``test_pipeline``'s)."""
    write_tiny_dataset(tmp_path / "data", n=3)
    return build_cache(discover(tmp_path / "data"), str(tmp_path / "cache"))


def assert_same_batches(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype
            np.testing.assert_array_equal(x[key], y[key])


def elements(subjects, augment, seed=5, size=(8, 8, 8), flip=False):
    """The un-batched patch stream as a ``MapDataset``: element ``i`` is step ``i``'s patch."""
    sampler = PatchSampler(size, tumour_prob=0.5, flip=flip, augment=augment)
    return grain.MapDataset.source(list(enumerate(subjects))).seed(seed).shuffle().repeat().random_map(sampler)


def test_augment_off_is_the_plain_patch_stream(subjects):
    """The default block, and every probability 0 with other ranges, give the stream of no ``augment`` at all;
    that stream's centres are those the code drew before augmentation existed, its patches plain crops."""
    plain = take(patch_dataset(subjects, (8, 10, 12), seed=1, batch_size=2, tumour_prob=0.5), 4)
    off = {**{name: 0.0 for name in ALL_ON}, "scale_range": (0.9, 1.1), "image_order": 3}
    for augment in (data_config().augment, off):
        got = take(patch_dataset(subjects, (8, 10, 12), seed=1, batch_size=2, tumour_prob=0.5, augment=augment), 4)
        assert_same_batches(plain, got)
    drawn = [(int(s), *map(int, c)) for b in plain for s, c in zip(b["subject_index"], b["centre"], strict=True)]
    assert drawn == RECORDED
    for b in plain:
        for s, c, image in zip(b["subject_index"], b["centre"], b["image"], strict=True):
            np.testing.assert_array_equal(image, crop_centered(subjects[s].image(), c, (8, 10, 12)))


def test_flip_is_p_mirror_one_half(subjects):
    flipped = take(patch_dataset(subjects, (8, 8, 8), seed=4, batch_size=2, flip=True), 6)
    mirrored = take(patch_dataset(subjects, (8, 8, 8), seed=4, batch_size=2, augment={"p_mirror": 0.5}), 6)
    assert_same_batches(flipped, mirrored)


def test_a_seed_and_index_give_one_augmented_patch_another_seed_another(subjects):
    a, b, other = elements(subjects, ALL_ON), elements(subjects, ALL_ON), elements(subjects, ALL_ON, seed=6)
    for i in range(4):
        assert_same_batches([a[i]], [b[i]])
        assert not np.array_equal(a[i]["image"], other[i]["image"])
    plain = elements(subjects, None)
    assert all(not np.array_equal(a[i]["image"], plain[i]["image"]) for i in range(4))  # it did augment


def test_resumed_iterator_continues_the_augmented_stream(subjects):
    def stream():
        return iter(patch_dataset(subjects, (8, 8, 8), seed=3, batch_size=2, tumour_prob=0.5, augment=HALF_ON))

    it = stream()
    take(it, 3)
    state = it.get_state()
    expected = take(it, 4)
    resumed = stream()
    resumed.set_state(state)
    assert_same_batches(expected, take(resumed, 4))


def test_mirroring_flips_image_and_label_exactly(subjects):
    plain, mirrored = elements(subjects, None), elements(subjects, {"p_mirror": 1.0})
    for i in range(3):
        np.testing.assert_array_equal(mirrored[i]["centre"], plain[i]["centre"])
        np.testing.assert_array_equal(mirrored[i]["label"], np.flip(plain[i]["label"]))
        np.testing.assert_array_equal(mirrored[i]["image"], np.flip(plain[i]["image"], (0, 1, 2)))


def test_intensity_scale_and_shift_on_the_brain():
    image = np.full((4, 4, 4, 4), 2.0, np.float32)
    image[0] = 0  # background
    scale, shift = np.array([0.5, 1.0, 1.5, 2.0]), np.array([0.1, -0.2, 0.0, 0.3])
    out, _ = apply_voxelwise({"intensity": (scale, shift)}, image, np.zeros((4, 4, 4), np.uint8))
    np.testing.assert_allclose(out[1:], np.broadcast_to([1.1, 1.8, 3.0, 4.3], (3, 4, 4, 4)), rtol=1e-6)
    assert np.all(out[0] == 0) and out.dtype == np.float32


def test_gamma_one_is_identity_and_gamma_two_squares_the_rescaled_values():
    image = np.random.default_rng(0).normal(size=(6, 6, 6, 4)).astype(np.float32)
    label = np.zeros((6, 6, 6), np.uint8)
    same, _ = apply_voxelwise({"gamma": np.ones(4)}, image, label)
    np.testing.assert_allclose(same, image, rtol=1e-5, atol=1e-6)
    ramp = np.zeros((4, 1, 1, 1), np.float32)
    ramp[1:, 0, 0, 0] = [1.0, 2.0, 3.0]  # the brain's range [1, 3]; voxel 0 is background
    squared, _ = apply_voxelwise({"gamma": np.array([2.0])}, ramp, np.zeros((4, 1, 1), np.uint8))
    np.testing.assert_allclose(squared[:, 0, 0, 0], [0.0, 1.0, 1.5, 3.0], rtol=1e-6)  # ((v-1)/2)^2 * 2 + 1


def test_noise_has_its_standard_deviation_and_blur_keeps_the_mass():
    zeros = np.zeros((16, 16, 16, 2), np.float32)
    noisy, _ = apply_voxelwise({"noise": (0.25, 7)}, zeros, np.zeros((16, 16, 16), np.uint8))
    assert abs(noisy.std() - 0.25) < 0.01
    delta = zeros.copy()
    delta[8, 8, 8] = 1.0
    blurred, _ = apply_voxelwise({"blur": np.array([0.5, 1.0])}, delta, np.zeros((16, 16, 16), np.uint8))
    np.testing.assert_allclose(blurred.sum((0, 1, 2)), [1.0, 1.0], rtol=1e-5)
    assert blurred[8, 8, 8, 0] > blurred[8, 8, 8, 1] > 0 and blurred[8, 8, 9, 1] > 0


def turned(volume, angles, scale=1.0, order=0, size=(9, 9, 9), centre=(10, 11, 12)):
    sampler = PatchSampler(size)
    return sampler._crop(volume, np.array(centre), affine_matrix(angles, scale), order)


def test_no_rotation_and_scale_one_is_the_plain_crop():
    label = tiny_label()
    image = np.random.default_rng(1).normal(size=(*label.shape, 4)).astype(np.float32)
    for order in (1, 3):
        np.testing.assert_allclose(turned(image, (0, 0, 0), order=order), crop_centered(image, (10, 11, 12), (9,) * 3),
                                   atol=1e-5)
    np.testing.assert_array_equal(turned(label, (0, 0, 0)), crop_centered(label, (10, 11, 12), (9,) * 3))


@pytest.mark.parametrize("angles,axes", [((90, 0, 0), (1, 2)), ((0, 90, 0), (0, 2)), ((0, 0, 90), (0, 1))])
def test_a_quarter_turn_of_the_label_is_rot90(angles, axes):
    label = tiny_label()
    plain = crop_centered(label, (10, 11, 12), (9, 9, 9))
    got = turned(label, angles)
    assert not np.array_equal(got, plain)
    np.testing.assert_array_equal(got, np.rot90(plain, -1, axes))


def test_scaling_two_fold_magnifies_about_the_centre():
    label = tiny_label()
    got = turned(label, (0, 0, 0), scale=2.0, size=(5, 5, 5))
    np.testing.assert_array_equal(got[::2, ::2, ::2], crop_centered(label, (10, 11, 12), (3, 3, 3)))


@pytest.mark.parametrize("order", [0, 1, 3])
def test_a_turned_patch_at_the_edge_reads_zeros_beyond_the_volume(order):
    """Only the part of the volume the patch touches is read; beyond the edge it is as if zero-padded."""
    volume = np.random.default_rng(2).normal(size=(12, 14, 16, 2)).astype(np.float32) + 3
    matrix = affine_matrix((20, -35, 50), 0.8)
    got = turned_patch(volume, (1, 12, 8), matrix, (10, 10, 10), order)
    padded = turned_patch(np.pad(volume, [(30, 30)] * 3 + [(0, 0)]), (31, 42, 38), matrix, (10, 10, 10), order)
    np.testing.assert_allclose(got, padded, atol=1e-5)
    assert np.abs(got).min() < 1e-3 and np.abs(got).max() > 1  # the patch reaches beyond the volume


def test_turned_patches_keep_shapes_dtypes_and_label_values(subjects):
    ds = elements(subjects, {"p_rotate": 1.0, "p_scale": 1.0, "max_rotate_deg": 45.0}, size=(8, 10, 12))
    plain = elements(subjects, None, size=(8, 10, 12))
    for i in range(6):
        x = ds[i]
        assert x["image"].shape == (8, 10, 12, 4) and x["image"].dtype == np.float32
        assert x["label"].shape == (8, 10, 12) and x["label"].dtype == np.uint8
        assert set(np.unique(x["label"])) <= {0, 1, 2, 4}
        assert not np.array_equal(x["label"], plain[i]["label"])


def test_the_config_block_resolves_to_the_defaults_and_presets_fill_what_is_unset():
    block = data_config().augment
    assert resolve_augment(block) == Augment() and not Augment().on
    assert resolve_augment(block, flip=True) == Augment(p_mirror=0.5)
    block.preset = "nnunet"
    block.p_rotate = 0.0  # one probability set: the others keep the preset's (one placeholder each)
    got = resolve_augment(block)
    assert got.p_rotate == 0.0 and got.p_scale == 0.2 and got.p_gamma == 0.3 and got.p_mirror == 0.5
    assert block.p_scale is None


def test_training_patches_passes_the_augment_block(monkeypatch):
    from cmfl_jax.config_variants import load_config

    config = load_config("cmft:smoke")
    seen = {}
    monkeypatch.setattr(loop, "patch_dataset", lambda entries, *args, **kwargs: seen.update(kwargs))
    loop.training_patches(config, [])
    assert seen["augment"] is config.data.augment


@pytest.mark.parametrize("key,value", [
    ("p_rotate", 1.5), ("p_gamma", -0.1), ("preset", "bogus"), ("scale_range", (1.2, 0.8)), ("gamma_range", (0, 1)),
    ("noise_std", (-1.0, 0.1)), ("blur_sigma", 3.0), ("image_order", 2), ("max_rotate_deg", 400.0), ("p_rotation", 0.1),
])
def test_bad_settings_name_their_key(subjects, key, value):
    with pytest.raises(CMFLError) as e:
        patch_dataset(subjects, (8, 8, 8), seed=0, augment={"preset": "nnunet", key: value})
    assert e.value.where == f"config.data.augment.{key}"


@pytest.mark.slow
def test_a_worker_process_gives_the_same_augmented_patches(subjects):
    """The sampler and its settings travel to grain's worker processes (pickled) and draw the same numbers."""
    expected = take(patch_dataset(subjects, (8, 8, 8), seed=7, augment=HALF_ON), 3)
    it = iter(patch_dataset(subjects, (8, 8, 8), seed=7, num_workers=1, augment=HALF_ON))
    try:
        got = take(it, 3)
    finally:
        it.close() if hasattr(it, "close") else None
    assert_same_batches(expected, got)
