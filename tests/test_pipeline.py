"""The grain patch pipeline: determinism, resumable state, tumour-centred patches, padding, flips."""

from __future__ import annotations

import time

import grain
import numpy as np
import pytest

from cmfl_jax.data.cache import build_cache
from cmfl_jax.data.layouts import discover
from cmfl_jax.data.pipeline import crop_centered, patch_dataset

from .conftest import write_tiny_dataset


@pytest.fixture
def entries(tmp_path):
    write_tiny_dataset(tmp_path / "data", n=3)
    return build_cache(discover(tmp_path / "data"), str(tmp_path / "cache"))


def take(ds_or_iter, n):
    it = iter(ds_or_iter)
    return [next(it) for _ in range(n)]


def test_same_seed_same_patches_other_seed_differs(entries):
    a = take(patch_dataset(entries, (8, 8, 8), seed=1, tumour_prob=0.5), 6)
    b = take(patch_dataset(entries, (8, 8, 8), seed=1, tumour_prob=0.5), 6)
    c = take(patch_dataset(entries, (8, 8, 8), seed=2, tumour_prob=0.5), 6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["centre"], y["centre"])
    assert any(not np.array_equal(x["centre"], y["centre"]) for x, y in zip(a, c, strict=True))


def test_restored_state_continues_same_sequence(entries):
    ds = patch_dataset(entries, (8, 8, 8), seed=3, batch_size=2, flip=True)
    it = iter(ds)
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    resumed = iter(patch_dataset(entries, (8, 8, 8), seed=3, batch_size=2, flip=True))
    resumed.set_state(state)
    for x, y in zip(expected, [next(resumed) for _ in range(5)], strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
        np.testing.assert_array_equal(x["subject_index"], y["subject_index"])


def test_batches_and_centres_in_tumour(entries):
    batches = take(patch_dataset(entries, (8, 8, 8), seed=0, batch_size=2, tumour_prob=1.0), 10)
    b = batches[0]
    assert b["image"].shape == (2, 8, 8, 8, 4) and b["image"].dtype == np.float16  # the cache's default storage
    assert b["label"].shape == (2, 8, 8, 8) and b["label"].dtype == np.uint8
    for b in batches:
        for i in range(2):
            entry = entries[int(b["subject_index"][i])]
            assert entry.label()[tuple(b["centre"][i])] > 0
            assert b["label"][i][4, 4, 4] == entry.label()[tuple(b["centre"][i])]  # centre voxel of the patch
            np.testing.assert_array_equal(b["image"][i], crop_centered(entry.image(), b["centre"][i], (8, 8, 8)))
            assert b["image"][i].dtype == np.float16 and entry.image().dtype == np.float32


def test_every_subject_is_visited_once_per_epoch(entries):
    seen = [int(b["subject_index"][0]) for b in take(patch_dataset(entries, (4, 4, 4), seed=5), 9)]
    assert sorted(seen[:3]) == sorted(seen[3:6]) == sorted(seen[6:]) == [0, 1, 2]


def test_background_patches_when_tumour_prob_zero(entries):
    batches = take(patch_dataset(entries, (4, 4, 4), seed=0, tumour_prob=0.0), 30)
    in_tumour = [entries[int(b["subject_index"][0])].label()[tuple(b["centre"][0])] > 0 for b in batches]
    assert not all(in_tumour)  # tumour is ~4% of the brain: 30 uniform draws all inside is ~1e-42


def centre_draws(entries, tumour_prob, n, seed):
    """Subject index, centre and whether the centre is tumour, for ``n`` single-patch batches (4^3)."""
    labels = [np.asarray(e.label()) for e in entries]
    draws = take(patch_dataset(entries, (4, 4, 4), seed=seed, tumour_prob=tumour_prob), n)
    subjects = np.array([int(b["subject_index"][0]) for b in draws])
    centres = np.array([b["centre"][0] for b in draws])
    in_tumour = np.array([labels[s][tuple(c)] > 0 for s, c in zip(subjects, centres, strict=True)])
    return subjects, centres, in_tumour


@pytest.mark.parametrize("tumour_prob,n", [(0.0, 300), (0.3, 450)])
def test_share_of_centres_in_the_tumour_matches_tumour_prob(entries, tumour_prob, n):
    """A centre is a tumour voxel with probability p + (1 - p) q: p for a tumour draw, then q for a uniform draw.

    The uniform draw is over the brain's bounding box (``meta["brain_bbox"]``), so q is the share of that
    box the tumour fills (~5 % here). Deterministic (fixed seed); the bound is 4.5 binomial sigmas, so a
    changed random stream would not break it, while a wrong p does: with these draws, expecting p = 0.1
    instead of 0 gives z = -5.6, and p = 0.2 or 0.5 instead of 0.3 gives z = +5.5 or -7.4.
    """
    q = []
    for e in entries:
        box = e.meta["brain_bbox"]
        inside = np.asarray(e.label())[tuple(slice(lo, hi) for lo, hi in box)] > 0
        assert np.count_nonzero(inside) == len(e.tumour_index())  # the whole tumour is in the box
        q.append(inside.mean())
    assert all(0.02 < x < 0.1 for x in q)
    subjects, _, in_tumour = centre_draws(entries, tumour_prob, n, seed=11)
    assert np.bincount(subjects).tolist() == [n // 3] * 3  # every subject once per epoch
    prob = tumour_prob + (1 - tumour_prob) * np.asarray(q)[subjects]  # per draw
    expected, sigma = prob.sum(), np.sqrt(np.sum(prob * (1 - prob)))
    assert abs(in_tumour.sum() - expected) < 4.5 * sigma, (in_tumour.sum(), expected, sigma)


def test_tumour_centres_are_uniform_over_the_tumour(entries):
    """With tumour_prob=1 the centres are tumour voxels drawn uniformly: each class as often as its share of
    the tumour's voxels, and the mean centre at the tumour's centroid (within 4.5 binomial/normal sigmas)."""
    subjects, centres, in_tumour = centre_draws(entries, 1.0, 150, seed=12)
    assert in_tumour.all()
    labels = [np.asarray(e.label()) for e in entries]
    classes = np.array([labels[s][tuple(c)] for s, c in zip(subjects, centres, strict=True)])
    for k in (1, 2, 4):
        share = np.array([np.mean(lab[lab > 0] == k) for lab in labels])[subjects]
        assert abs(np.sum(classes == k) - share.sum()) < 4.5 * np.sqrt(np.sum(share * (1 - share))), k
    voxels = [np.argwhere(lab > 0) for lab in labels]
    mean = np.array([v.mean(0) for v in voxels])[subjects].mean(0)
    sd_of_mean = np.sqrt(np.array([v.var(0) for v in voxels])[subjects].sum(0)) / len(subjects)
    assert np.all(np.abs(centres.mean(0) - mean) < 4.5 * sd_of_mean), (centres.mean(0), mean, sd_of_mean)


def test_patch_larger_than_volume_is_zero_padded(entries):
    (b,) = take(patch_dataset(entries, (32, 32, 32), seed=0), 1)
    assert b["image"].shape == (1, 32, 32, 32, 4)
    entry = entries[int(b["subject_index"][0])]
    assert np.count_nonzero(b["label"]) == np.count_nonzero(entry.label())  # the whole tumour is inside
    assert np.all(b["image"][0, 0] == 0) or np.all(b["image"][0, -1] == 0)


def test_flip_keeps_image_and_label_aligned(entries):
    plain = take(patch_dataset(entries, (8, 8, 8), seed=4, flip=False), 8)
    flipped = take(patch_dataset(entries, (8, 8, 8), seed=4, flip=True), 8)
    n_flipped = 0
    for p, f in zip(plain, flipped, strict=True):
        if not np.array_equal(p["centre"], f["centre"]):
            continue  # the flip draw changed the random stream; compare only equal centres
        for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]:
            ax = tuple(a + 1 for a in axes)
            if np.array_equal(np.flip(p["label"], ax), f["label"]) and np.array_equal(
                np.flip(p["image"], ax), f["image"]
            ):
                n_flipped += bool(axes)
                break
        else:
            raise AssertionError("flipped patch is not a flip of the plain one")
    assert n_flipped > 0


def test_host_shards_split_each_global_batch(entries):
    """Two hosts with 2 patches each per step see, step by step, the 4 patches one host with batch 4 sees."""
    size, steps = (8, 8, 8), 3
    whole = take(patch_dataset(entries, size, seed=6, batch_size=4, tumour_prob=0.5), steps)
    hosts = [take(patch_dataset(entries, size, seed=6, batch_size=2, tumour_prob=0.5,
                                shard=grain.sharding.ShardOptions(i, 2)), steps) for i in range(2)]

    def patches(batch):
        return sorted((int(s), tuple(c), float(img.sum())) for s, c, img in
                      zip(batch["subject_index"], batch["centre"], batch["image"], strict=True))

    for step in range(steps):
        assert patches(hosts[0][step]) != patches(hosts[1][step])
        assert sorted(patches(hosts[0][step]) + patches(hosts[1][step])) == patches(whole[step])


def test_crop_centered_reads_window():
    vol = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    np.testing.assert_array_equal(crop_centered(vol, (2, 3, 3), (3, 3, 3)), vol[1:4, 2:5, 2:5])
    edge = crop_centered(vol, (0, 0, 0), (3, 3, 3))
    assert edge[0].sum() == 0 and edge[1, 1, 1] == vol[0, 0, 0]


@pytest.mark.slow
def test_worker_processes_give_the_same_patches(entries):
    expected = take(patch_dataset(entries, (8, 8, 8), seed=7), 3)
    it = iter(patch_dataset(entries, (8, 8, 8), seed=7, num_workers=1))
    try:
        got = [next(it) for _ in range(3)]
    finally:
        it.close() if hasattr(it, "close") else None
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_read_ahead_is_bounded(entries, monkeypatch):
    """grain reads ahead at most max(READ_THREADS, READ_AHEAD_BATCHES x batch) patches (its default is 500, 1.1 GB
    at 64^3): after one batch of 2 and a pause, the sampler has cut at most 2 + 4 patches."""
    from cmfl_jax.data import pipeline

    calls = []
    cut = pipeline.PatchSampler.random_map
    monkeypatch.setattr(pipeline.PatchSampler, "random_map", lambda self, *a: calls.append(1) or cut(self, *a))
    it = iter(patch_dataset(entries, (8, 8, 8), seed=0, batch_size=2))
    assert next(it)["image"].shape[0] == 2
    time.sleep(1.0)  # an unbounded read-ahead cuts hundreds of 8^3 patches meanwhile
    assert pipeline.read_ahead(2).prefetch_buffer_size == 4 and 2 <= len(calls) <= 2 + 4, len(calls)
