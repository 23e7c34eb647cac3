"""Augmentation on the device (``config.data.augment.where="device"``) against the host's scipy/numpy version.

Tolerances, and why:
- Linear resample: scipy computes the sampling points in float64, the device in float32. A point's coordinate is
  off by at most ~1e-5 voxel in windows under 100 voxels (float32's step at 64 is 7.6e-6, plus the rounding of
  ``matrix @ offset``), so a value differs by at most that times the largest difference of two neighbours along
  each axis: tolerance 1e-5 x that difference (summed over the three axes), no exception at the edge (the window is
  zero-padded where scipy's ``grid-constant`` reads zeros). Observed on unit-variance noise: at most 1.1e-5.
- Nearest label: identical except where a sampling point lies within that rounding of a half-voxel tie; every
  differing voxel must be such a near-tie (float64 distance to .5 below 1e-4). Such points are rare (2 of 4096
  voxels at generic angles) but angles of 30 deg (sin = 1/2) make exact ties, where scipy's float64 noise decides:
  at (-30, 30, -30) and scale 0.7, 29 of 4096, of which 6 (0.15%) differ; the bound is 0.5% differing. (Scale 2
  puts every point on a tie, exactly in float32 too: both round half up, nothing differs.)
- Intensity, gamma, blur (scipy's ``gaussian_filter``, ``mode="reflect"``, ``truncate=4.0``): float32 rounding,
  1e-6 (absolute, values of order 1).
- Noise: other generator (``jax.random`` from the drawn seed): the same mean and standard deviation within 3% of
  sampling error, the same values for the same seed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from cmfl_jax import sharding
from cmfl_jax.data import device_augment as dev
from cmfl_jax.data.augment import Augment, affine_matrix, apply_voxelwise, resolve_augment, turned_patch
from cmfl_jax.data.cache import build_cache
from cmfl_jax.data.device_inputs import (
    largest_reach,
    packed,
    rotations,
    stack_patches,
    window_reach,
    window_shape,
    window_start,
)
from cmfl_jax.data.layouts import discover
from cmfl_jax.data.pipeline import crop_centered, patch_dataset
from cmfl_jax.errors import CMFLError
from cmfl_jax.training import loop

from .conftest import write_tiny_dataset
from .test_pipeline import take

PATCH = (16, 16, 16)
TURNS = [((25, -17, 30), 0.75), ((-30, 30, -30), 0.7), ((10, 0, -5), 1.4), ((0, 0, 0), 0.9)]
SETTINGS = Augment(p_rotate=1.0, p_scale=1.0, max_rotate_deg=30.0, scale_range=(0.7, 1.4))


def resample_on_device(volume, centre, matrix, label=None, extent=None):
    """The device's resample of the window the host ships for ``SETTINGS`` (at most ``extent``)."""
    window = np.array(window_shape(SETTINGS, PATCH, extent))
    start = window_start(centre, window_reach(SETTINGS, PATCH), window, volume.shape)
    image = crop_centered(volume, start + window // 2, window)
    label = None if label is None else crop_centered(label, start + window // 2, window)
    resample = jax.jit(lambda i, lb, m, o: dev.resample(i, lb, m, o, PATCH))
    return jax.device_get(resample(image, label, jnp.asarray(matrix, jnp.float32), np.asarray(centre) - start))


def test_rotations_are_affine_matrix_and_the_window_holds_every_draw():
    angles = np.random.default_rng(0).uniform(-30, 30, (500, 3))
    np.testing.assert_allclose(rotations(angles), [affine_matrix(a) for a in angles], atol=1e-12)
    reach = largest_reach(30.0, (8, 8, 8))
    assert np.all(np.abs(rotations(angles)) @ np.full(3, 8.0) <= reach[None] + 1e-9)
    assert np.all(reach <= 8 * np.sqrt(3)) and np.all(reach > 8 * 1.3)  # tighter than the sphere, wider than a box
    reach = window_reach(SETTINGS, PATCH)
    for a in angles:  # every point read and its linear neighbour, at the smallest scale
        assert np.all(np.abs(affine_matrix(a, 0.7)) @ (np.array(PATCH) // 2) + 1 <= reach)
    assert window_shape(SETTINGS, PATCH) == tuple(2 * reach + 1)
    assert window_reach(Augment(p_mirror=1.0), PATCH).tolist() == [10, 10, 10]  # 8 + a rounding voxel + 1
    assert window_shape(Augment(p_mirror=1.0), PATCH, extent=(5, 5, 5)) == (17, 17, 17)  # never the patch's shape
    assert window_shape(SETTINGS, (64,) * 3, extent=(70, 200, 90)) == (70, 161, 90)  # at most the largest volume


@pytest.mark.parametrize("centre,start", [((20, 22, 19), (11, 13, 8)), ((1, 40, 3), (0, 25, 0)),
                                          ((15, 5, 10), (6, 0, 1))])
def test_a_window_is_moved_inside_the_volume_and_holds_all_the_reach_has(centre, start):
    """Reach 9 either way in a (40, 44, 38) volume, windows of 19, 19 and (wider than the reach) 30: centre - 9
    where that fits, else moved inside (start 0, or the volume's end - the window)."""
    got = window_start(centre, (9, 9, 9), (19, 19, 30), (40, 44, 38))
    assert tuple(got) == start
    for c, s, n, w in zip(centre, got, (40, 44, 38), (19, 19, 30), strict=True):
        assert s <= max(c - 9, 0) and min(c + 9, n - 1) < s + w


@pytest.mark.parametrize("angles,scale", TURNS)
@pytest.mark.parametrize("centre", [(20, 22, 19), (1, 40, 3)])  # inside; at the edge (zeros beyond the volume)
@pytest.mark.parametrize("extent", [None, (40, 44, 38)])  # the window of the reach; clipped to the volume
def test_linear_resample_is_scipys_up_to_float32_coordinates(angles, scale, centre, extent):
    volume = np.random.default_rng(1).normal(size=(40, 44, 38, 2)).astype(np.float32) + 1
    matrix = affine_matrix(angles, scale)
    expected = turned_patch(volume, centre, matrix, PATCH, 1)
    got, _ = resample_on_device(volume, centre, matrix, extent=extent)
    neighbours = sum(np.abs(np.diff(volume, axis=a)).max() for a in range(3))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * neighbours)
    assert np.abs(got - expected).max() < 3e-5 and np.abs(expected).max() > 1


@pytest.mark.parametrize("angles,scale", [*TURNS, ((90, 0, 0), 1.0), ((0, 0, 0), 2.0)])
def test_nearest_label_is_scipys_but_at_half_voxel_ties(angles, scale):
    label = np.random.default_rng(2).choice(np.array([0, 1, 2, 4], np.uint8), size=(40, 44, 38))
    centre, matrix = np.array([20, 22, 19]), affine_matrix(angles, scale)
    expected = turned_patch(label, centre, matrix, PATCH, 0)
    _, got = resample_on_device(label[..., None].astype(np.float32), centre, matrix, label=label)
    offsets = np.stack(np.meshgrid(*[np.arange(p) - p // 2 for p in PATCH], indexing="ij"), -1)
    where = offsets @ matrix.T  # float64, as scipy's
    near_tie = np.any(np.abs(np.abs(where - np.floor(where)) - 0.5) < 1e-4, axis=-1)
    differ = got != expected
    assert not np.any(differ & ~near_tie)
    assert differ.mean() <= 0.005


def test_a_window_without_a_resample_gives_back_the_padded_patch_exactly():
    rng = np.random.default_rng(3)
    patch = {"image": rng.normal(size=(*PATCH, 2)).astype(np.float32), "label": rng.integers(0, 5, PATCH, np.uint8),
             "augment": packed({}, 2)}
    window = window_shape(SETTINGS, PATCH)
    turned = {"image": np.ones((*window, 2), np.float32), "label": np.ones(window, np.uint8),
              "augment": packed({"matrix": affine_matrix((10, 0, 0))}, 2, origin=np.array(window) // 2)}
    batch = stack_patches([patch, turned], window)
    assert batch["image"].shape == (2, *window, 2) and batch["augment"]["on"][:, 0].tolist() == [False, True]
    out = jax.jit(lambda b: dev.augment_batch(b, patch=PATCH, radius=0))(batch)
    np.testing.assert_array_equal(out["image"][0], patch["image"])
    np.testing.assert_array_equal(out["label"][0], patch["label"])
    np.testing.assert_array_equal(out["label"][1], 1)  # turned inside a window of ones: all of it read there
    np.testing.assert_allclose(out["image"][1], 1.0, rtol=1e-6)


def brain_patch(seed=4):
    image = np.random.default_rng(seed).normal(size=(12, 12, 12, 4)).astype(np.float32)
    image[:3] = 0  # background
    return image


def test_intensity_and_gamma_on_the_brain_are_the_hosts():
    image, label = brain_patch(), np.zeros((12, 12, 12), np.uint8)
    scale, shift = np.array([0.75, 1.0, 1.2, 0.9]), np.array([0.1, -0.05, 0.0, 0.07])
    power = np.array([0.7, 1.0, 1.3, 1.5])
    brain = jnp.any(jnp.asarray(image) != 0, axis=-1)
    expected, _ = apply_voxelwise({"intensity": (scale, shift)}, image, label)
    got = dev.intensity(jnp.asarray(image), brain, jnp.float32(scale), jnp.float32(shift))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    expected, _ = apply_voxelwise({"gamma": power}, image, label)
    np.testing.assert_allclose(dev.gamma(jnp.asarray(image), brain, jnp.float32(power)), expected, rtol=0, atol=1e-6)
    assert np.all(expected[:3] == 0)


@pytest.mark.parametrize("sigma", [0.5, 0.73, 1.0, 0.1, 0.0])
def test_blur_is_scipys_gaussian_filter(sigma):
    image = brain_patch()
    sigmas = np.array([sigma, 1.0, 0.5, 0.62], np.float32)
    expected = np.stack([ndimage.gaussian_filter(image[..., c], float(s), mode="reflect", truncate=4.0)
                         for c, s in enumerate(sigmas)], -1)
    got = jax.jit(dev.blur, static_argnums=2)(jnp.asarray(image), jnp.asarray(sigmas), 4)  # radius of sigma 1
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    if sigma < 0.125:  # scipy's radius int(4 * sigma + 0.5) is 0: the channel is unchanged
        np.testing.assert_array_equal(np.asarray(got)[..., 0], image[..., 0])


def test_noise_has_the_drawn_std_and_is_a_function_of_the_seed():
    zeros = jnp.zeros((32, 32, 32, 2), jnp.float32)
    seed = 2**40 + 12345
    key = packed({"noise": (0.25, seed)}, 2)["noise_key"]
    assert key.tolist() == [2**8, 12345]  # the 64-bit seed's two words
    a, b = dev.noise(zeros, jnp.float32(0.25), key), dev.noise(zeros, jnp.float32(0.25), key)
    np.testing.assert_array_equal(a, b)
    other = dev.noise(zeros, jnp.float32(0.25), packed({"noise": (0.25, seed + 1)}, 2)["noise_key"])
    assert not np.array_equal(a, other)
    host, _ = apply_voxelwise({"noise": (0.25, seed)}, np.zeros((32, 32, 32, 2), np.float32),
                              np.zeros((32, 32, 32), np.uint8))
    n = a.size  # the sample std's relative standard error is 1/sqrt(2n) = 0.3%
    assert abs(float(a.std()) - 0.25) < 0.03 * 0.25 and abs(float(a.mean())) < 4 * 0.25 / np.sqrt(n)
    assert abs(float(a.std()) - host.std()) < 0.03 * 0.25


def test_mirroring_flips_the_flagged_axes():
    image, label = brain_patch(), np.arange(12**3, dtype=np.int32).reshape(12, 12, 12)
    got_image, got_label = dev.mirror(jnp.asarray(image), jnp.asarray(label), jnp.array([True, False, True]))
    np.testing.assert_array_equal(got_image, np.flip(image, (0, 2)))
    np.testing.assert_array_equal(got_label, np.flip(label, (0, 2)))


@pytest.fixture
def subjects(tmp_path):
    write_tiny_dataset(tmp_path / "data", n=3)
    return build_cache(discover(tmp_path / "data"), str(tmp_path / "cache"))


def test_the_device_stream_is_the_host_stream_augmented_on_the_device(subjects):
    """Same seed, same draws: the device's batches equal the host's (noise off, whose values differ by design)
    within the resample's tolerance, at centres drawn alike; a batch of two mixes a patch and a window."""
    settings = {"preset": "nnunet", "p_rotate": 0.3, "p_noise": 0.0, "p_intensity": 0.5}
    host = take(patch_dataset(subjects, PATCH, seed=2, batch_size=2, tumour_prob=0.5, augment=settings), 8)
    shipped = take(patch_dataset(subjects, PATCH, seed=2, batch_size=2, tumour_prob=0.5,
                                 augment={**settings, "where": "device"}), 8)
    config = loop_config(settings)
    augment, mesh = dev.device_augmentation(config), sharding.make_mesh()
    shapes, mixes = set(), set()
    for h, s in zip(host, shipped, strict=True):
        np.testing.assert_array_equal(h["centre"], s["centre"])
        shapes.add(s["image"].shape[1])
        got = jax.device_get(augment(loop.to_device(loop.device_batch(s, ("image", "label")), mesh), mesh))
        assert got.keys() == {"image", "label"} and got["image"].dtype == np.float32
        close = np.isclose(got["image"], h["image"], rtol=0, atol=2e-4)
        assert close.mean() > 0.999, close.mean()  # the rest: brain-mask edges moved by a rounding (then +shift)
        assert (got["label"] != h["label"]).mean() <= 0.005
        mixes.add(tuple(s["augment"]["on"][:, 0]))
    assert shapes == {PATCH[0], 20} and (True, False) in mixes  # plain batches, windows (the 20^3 volumes)


@pytest.mark.slow
def test_a_worker_process_ships_the_same_device_batches(subjects):
    """The sampler's window settings and the batching of patches with windows travel to grain's workers."""
    settings = {"preset": "nnunet", "p_rotate": 0.3, "where": "device"}
    expected = take(patch_dataset(subjects, PATCH, seed=2, batch_size=2, tumour_prob=0.5, augment=settings), 6)
    it = iter(patch_dataset(subjects, PATCH, seed=2, batch_size=2, tumour_prob=0.5, augment=settings, num_workers=1))
    try:
        got = take(it, 6)
    finally:
        it.close()
    assert {b["image"].shape[1] for b in expected} == {PATCH[0], 20}
    for a, b in zip(expected, got, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def loop_config(augment):
    from cmfl_jax.config_variants import load_config

    config = load_config("cmff:smoke")
    config.data.patch_size = PATCH
    config.data.augment.update({**augment, "where": "device"})
    return config


def test_where_is_checked_and_device_needs_linear_interpolation():
    with pytest.raises(CMFLError) as e:
        resolve_augment({"preset": "nnunet", "where": "gpu"})
    assert e.value.where == "config.data.augment.where"
    with pytest.raises(CMFLError) as e:
        resolve_augment({"preset": "nnunet", "where": "device", "image_order": 3})
    assert e.value.where == "config.data.augment.image_order"
    assert dev.device_augmentation(loop_config({"preset": "none"})) is None  # nothing drawn: nothing to apply
    assert dev.device_augmentation(loop_config({"preset": "nnunet"})).radius == 4  # int(4 * 1.0 + 0.5)


@pytest.mark.slow
def test_a_device_augmented_run_is_deterministic_and_resumes_exactly(tmp_path, monkeypatch):
    """A tiny CMFF with the nnU-Net preset on the device (patch 16^3): 6 steps straight, and 3 steps then a resume
    to 6, give bit-equal logged losses and final params (steps 1-3 are two identical runs; 4-6 the resumed
    iterator and states); the device function ran on every batch."""
    from flax import traverse_util

    from cmfl_jax.jobs.cmff import train as train_cmff

    from .test_cmff_train import tiny_cmff_config
    from .test_determinism import metric_lines

    write_tiny_dataset(tmp_path / "data", n=3)
    monkeypatch.setenv("CMFL_JAX_CACHE", str(tmp_path / "cache"))
    calls = []
    inner = dev.DeviceAugment.__call__
    monkeypatch.setattr(dev.DeviceAugment, "__call__",
                        lambda self, b, m: calls.append(b["image"].shape[1]) or inner(self, b, m))
    common = {"init.mode": "random", "data.split.folds": 1, "train.save_every": 3, "data.augment.preset": "nnunet",
              "data.augment.p_rotate": 0.5, "data.augment.where": "device"}

    def run(workdir, steps):
        states = train_cmff(tiny_cmff_config(tmp_path / "data", steps=steps, **common), str(workdir))
        return traverse_util.flatten_dict(jax.device_get(states["seg"].params), sep="/")

    straight = run(tmp_path / "straight", 6)
    assert len(calls) == 6 and {16, 20} <= set(calls)  # patches and windows (the 20^3 volumes)
    run(tmp_path / "resumed", 3)
    resumed = run(tmp_path / "resumed", 6)
    assert len(calls) == 12
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
    losses = [(x["step"], x["train/loss"]) for x in metric_lines(tmp_path / "straight") if "train/loss" in x]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert losses == [(x["step"], x["train/loss"]) for x in metric_lines(tmp_path / "resumed") if "train/loss" in x]
