"""The pre-processed cache: crop and uncrop, compact storage, one entry per source files, rebuild on change,
nothing half-written, and patches identical to those of the uncropped format-1 cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import ml_collections
import numpy as np
import pytest

from cmfl_jax.data.cache import CROP_MARGIN, _bbox, build_cache, cache_subject, preprocessed_dir
from cmfl_jax.data.cached_subject import CachedSubject, LazyVolume, storage_for, uncrop
from cmfl_jax.data.dataset import load_entries
from cmfl_jax.data.io import load_subject, read_nifti, write_nifti
from cmfl_jax.data.layouts import MODALITIES, discover, subject_file_paths, to_dataset
from cmfl_jax.data.pipeline import crop_centered, patch_dataset
from cmfl_jax.data.preprocess import preprocess_images
from cmfl_jax.errors import CMFLError

from .conftest import tiny_label, write_tiny_dataset, write_tiny_subject

BRAIN = (slice(6, 20), slice(5, 22), slice(9, 21))  # the brain of the bordered subject, far from the grid's edges
SHAPE = (30, 28, 32)


def write_bordered_subject(root, index: int = 0, seed: int = 0):
    """A subject whose brain fills only ``BRAIN`` (so the entry is cropped) and whose tumour sticks out of it
    on one side (so the crop must keep labelled voxels too)."""
    rng = np.random.default_rng(seed * 100 + index)
    subject = subject_file_paths(root, "brats2021", index)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for path in subject.images:
        volume = np.zeros(SHAPE, np.float32)
        volume[BRAIN] = rng.normal(size=volume[BRAIN].shape) * 10 + 100
        volume[BRAIN][rng.random(volume[BRAIN].shape) < 0.1] = 0  # holes: some modalities 0 inside the brain
        write_nifti(path, volume, affine)
    label = np.zeros(SHAPE, np.uint8)
    label[10:16, 8:14, 12:24] = 2  # axis 2 runs past the brain (21) to 24
    label[12:14, 10:12, 14:18] = 4
    label[12, 10, 15] = 1
    write_nifti(subject.label, to_dataset(label, subject.et_label), affine)
    return subject


def full_arrays(subject):
    """The pre-processed image (channels last) and label on the full grid, as format 1 cached them."""
    loaded = load_subject(subject)
    return np.moveaxis(preprocess_images(loaded.images), 0, -1), loaded.label


def data_config(root, cache) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"root": str(root), "require_labels": True, "cache_dir": str(cache),
                                      "normalization": "zscore_brain"})


def entry_names(cache_dir) -> list[str]:
    return sorted(n for n in os.listdir(cache_dir) if not n.startswith("."))


def test_cache_holds_preprocessed_channels_last(tmp_path):
    (subject,) = write_tiny_dataset(tmp_path / "data", n=1)
    entry = cache_subject(subject, str(tmp_path / "cache"))
    image = entry.image()
    assert isinstance(image, LazyVolume) and image.dtype == np.float32
    assert entry.meta["storage"] == "float16" and entry.stored_image().dtype == np.float16
    # Tiny subjects' brains reach the grid's edges (but for 2 background slices, inside the margin): no crop.
    assert image.shape == (20, 22, 24, 4) and entry.meta["crop_offset"] == [0, 0, 0]
    expected = np.moveaxis(preprocess_images(load_subject(subject).images), 0, -1)
    # The default storage rounds the z-scored values to float16 (nearest), and nothing else.
    np.testing.assert_array_equal(image, expected.astype(np.float16).astype(np.float32))
    assert 0 < np.max(np.abs(np.asarray(image) - expected)) <= 2.0**-11 * np.max(np.abs(expected))
    assert np.asarray(image).dtype == np.float32 and image[..., 0].shape == (20, 22, 24)
    np.testing.assert_array_equal(entry.label(), tiny_label())
    assert entry.meta["label_counts"] == {"0": 20 * 22 * 24 - 512, "1": 8, "2": 448, "4": 56}
    assert entry.meta["tumour_bbox"] == [[6, 14], [7, 15], [8, 16]]
    assert len(entry.tumour_index()) == 512 and entry.tumour_index().dtype == np.int32


@pytest.mark.parametrize("storage", ["float16", "blosc2", "npy"])
def test_cropped_entry_uncrops_to_the_preprocessed_volume_exactly(tmp_path, storage):
    subject = write_bordered_subject(tmp_path / "data")
    entry = cache_subject(subject, str(tmp_path / "cache"), storage=storage)
    image, label = full_arrays(subject)
    lo = [BRAIN[0].start - CROP_MARGIN, BRAIN[1].start - CROP_MARGIN, BRAIN[2].start - CROP_MARGIN]
    hi = [BRAIN[0].stop + CROP_MARGIN, BRAIN[1].stop + CROP_MARGIN, 24 + CROP_MARGIN]  # axis 2: the tumour's end
    assert entry.meta["crop_offset"] == lo and entry.shape == tuple(h - o for h, o in zip(hi, lo, strict=True))
    assert entry.meta["full_shape"] == list(SHAPE)
    # float32 storage, lossless either way: bit for bit, zeros outside the crop; float16: rounded, zeros outside.
    rounded = image.astype(np.float16).astype(np.float32) if storage == "float16" else image
    np.testing.assert_array_equal(uncrop(entry.image(), entry), rounded)
    assert uncrop(entry.image(), entry).dtype == np.float32
    np.testing.assert_array_equal(uncrop(entry.label(), entry), label)
    shift = lambda box: [[a + o, b + o] for (a, b), o in zip(box, lo, strict=True)]
    assert shift(entry.meta["brain_bbox"]) == _bbox(np.any(load_subject(subject).images != 0, axis=0))
    assert shift(entry.meta["tumour_bbox"]) == _bbox(label > 0)
    full_index = np.ravel_multi_index(
        tuple(c + o for c, o in zip(np.unravel_index(entry.tumour_index(), entry.shape), lo, strict=True)), SHAPE)
    np.testing.assert_array_equal(full_index, np.flatnonzero(label > 0))  # same voxels, same order
    assert entry.meta["label_counts"]["0"] == label.size - np.count_nonzero(label)  # counts of the full grid
    with pytest.raises(ValueError, match="cropped grid"):
        uncrop(image, entry)


def test_compact_windows_equal_the_arrays(tmp_path):
    """Windows read from the compressed entry (chunk by chunk) are those of the full array, bit for bit."""
    subject = write_bordered_subject(tmp_path / "data")
    entry = cache_subject(subject, str(tmp_path / "cache"), storage="blosc2")
    assert entry.meta["storage"] == "blosc2" and os.path.isfile(os.path.join(entry.path, "image.b2nd"))
    image, label = full_arrays(subject)
    offset = np.array(entry.meta["crop_offset"])
    rng = np.random.default_rng(0)
    for size in [(8, 8, 8), (16, 20, 12), (40, 40, 40)]:
        for _ in range(10):
            centre = np.array([rng.integers(-5, n + 5) for n in SHAPE])  # also off the grid
            np.testing.assert_array_equal(crop_centered(entry.image(), centre - offset, size),
                                          crop_centered(image, centre, size))
            np.testing.assert_array_equal(crop_centered(entry.label(), centre - offset, size),
                                          crop_centered(label, centre, size))


def format1_entry(subject, folder) -> CachedSubject:
    """The uncropped float32 ``.npy`` entry format 1 wrote for ``subject``: everything from the source files."""
    os.makedirs(folder)
    image, label = full_arrays(subject)
    np.save(os.path.join(folder, "image.npy"), image)
    np.save(os.path.join(folder, "label.npy"), label)
    np.save(os.path.join(folder, "tumour_index.npy"), np.flatnonzero(label > 0).astype(np.int64))
    meta = {"subject_id": subject.subject_id, "storage": "npy", "shape": list(SHAPE), "has_label": True,
            "brain_bbox": _bbox(np.any(load_subject(subject).images != 0, axis=0)), "tumour_bbox": _bbox(label > 0)}
    return CachedSubject(str(folder), meta)


@pytest.mark.parametrize("storage", ["float16", "blosc2"])
def test_training_patches_identical_to_the_uncropped_cache(tmp_path, storage):
    """Same seed: the same patches as from uncropped float32 entries (bit for bit; float16: their rounding), the same
    labels; the centres move by the crop offset."""
    subjects = [write_bordered_subject(tmp_path / "data", i) for i in range(2)]
    cropped = [cache_subject(s, str(tmp_path / "cache"), storage=storage) for s in subjects]
    full = [format1_entry(s, tmp_path / "format1" / s.subject_id) for s in subjects]
    for patch in [(8, 8, 8), (24, 24, 24)]:
        a = patch_dataset(cropped, patch, seed=4, batch_size=2, tumour_prob=0.5, flip=True)
        b = patch_dataset(full, patch, seed=4, batch_size=2, tumour_prob=0.5, flip=True)
        for x, y, _ in zip(iter(a), iter(b), range(12), strict=False):
            # flip is augmentation: the image is read as float32 (for float16 storage, its rounding)
            assert x["image"].dtype == y["image"].dtype == np.float32
            rounded = y["image"].astype(np.float16).astype(np.float32) if storage == "float16" else y["image"]
            np.testing.assert_array_equal(x["image"], rounded)
            np.testing.assert_array_equal(x["label"], y["label"])
            offsets = np.array([cropped[i].meta["crop_offset"] for i in x["subject_index"]])
            np.testing.assert_array_equal(x["centre"] + offsets, y["centre"])


def test_cache_reused_then_rebuilt_when_source_or_settings_change(tmp_path):
    (subject,) = write_tiny_dataset(tmp_path / "data", n=1)
    cache = str(tmp_path / "cache")
    first = cache_subject(subject, cache)
    mtime = os.path.getmtime(os.path.join(first.path, "image.npy"))
    assert cache_subject(subject, cache).path == first.path
    assert os.path.getmtime(os.path.join(first.path, "image.npy")) == mtime  # reused, not rewritten

    before = np.asarray(first.image())
    st = os.stat(subject.images[0])  # same bytes, newer modification time: rebuilt
    os.utime(subject.images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = cache_subject(subject, cache)
    assert touched.path != first.path and not os.path.exists(first.path)  # stale entry removed
    assert entry_names(cache) == [os.path.basename(touched.path)]
    np.testing.assert_array_equal(touched.image(), before)  # same bytes, same entry contents

    data, affine, _ = read_nifti(subject.images[0])
    time.sleep(0.01)
    write_nifti(subject.images[0], data * 3, affine)
    second = cache_subject(subject, cache)
    assert second.path != touched.path and entry_names(cache) == [os.path.basename(second.path)]

    third = cache_subject(subject, cache, normalization="none", storage="blosc2")
    assert third.path != second.path
    np.testing.assert_array_equal(third.image()[..., 0], data * 3)
    # another normalization is another valid entry, which a run sharing the cache may be reading: both stay
    assert entry_names(cache) == sorted(os.path.basename(p) for p in (second.path, third.path))
    assert cache_subject(subject, cache).path == second.path and os.path.isdir(third.path)


def test_storage_setting(tmp_path):
    """auto: float16 for z-scored data, lossless blosc2 for raw intensities (float16's step is 16 from 2^15 on);
    float16 with raw intensities, or an unknown storage, is a one-line error naming the key."""
    assert storage_for("auto", "zscore_brain") == "float16" and storage_for("auto", "none") == "blosc2"
    assert storage_for("npy", "none") == "npy"
    with pytest.raises(CMFLError, match="float16 holds z-scored intensities only") as e:
        storage_for("float16", "none")
    assert e.value.where == "config.data.cache_storage"
    with pytest.raises(CMFLError, match="unknown value 'zarr'"):
        storage_for("zarr", "zscore_brain")
    write_tiny_dataset(tmp_path / "data", n=1)
    config = data_config(tmp_path / "data", tmp_path / "c")
    config.normalization = "none"
    (entry,) = load_entries(config)  # the config has no cache_storage: auto
    assert entry.meta["storage"] == "blosc2" and entry.image().dtype == np.float32


def test_csv_root_and_folder_root_share_one_entry(tmp_path):
    subjects = write_tiny_dataset(tmp_path / "data", n=2)
    cache = tmp_path / "c"
    by_folder = load_entries(data_config(tmp_path / "data", cache))
    shared = preprocessed_dir(str(cache))
    assert entry_names(shared) == sorted(os.path.basename(e.path) for e in by_folder)

    os.symlink(tmp_path / "data", tmp_path / "link")  # the same files through a link, relative and absolute paths
    csv = tmp_path / "subjects.csv"
    rows = ["subject_id," + ",".join(MODALITIES) + ",seg"]
    for i, s in enumerate(subjects):
        paths = [p.replace(str(tmp_path / "data"), "link" if i else str(tmp_path / "link")) for p in s.images]
        rows.append(f"{s.subject_id}," + ",".join(paths) + "," + s.label)
    csv.write_text("\n".join(rows) + "\n")
    by_csv = load_entries(data_config(csv, cache))
    assert [e.path for e in by_csv] == [e.path for e in by_folder]
    assert [e.meta["layout"] for e in by_csv] == ["csv", "csv"] and by_folder[0].meta["layout"] == "brats2018"
    assert len(entry_names(shared)) == 2

    renamed = tmp_path / "renamed.csv"  # the same files under other ids: still the same entries
    renamed.write_text("\n".join([rows[0]] + [f"P{i}" + r[r.index(","):] for i, r in enumerate(rows[1:])]) + "\n")
    by_other_ids = load_entries(data_config(renamed, cache))
    assert [e.path for e in by_other_ids] == [e.path for e in by_folder]
    assert [e.subject_id for e in by_other_ids] == ["P0", "P1"] and len(entry_names(shared)) == 2


def test_stale_removal_spares_an_entry_of_the_same_id_from_other_files(tmp_path):
    a = write_tiny_subject(tmp_path / "a", "brats2021", 0, seed=1)
    b = write_tiny_subject(tmp_path / "b", "brats2021", 0, seed=2)
    assert a.subject_id == b.subject_id
    cache = str(tmp_path / "cache")
    ea, eb = cache_subject(a, cache), cache_subject(b, cache)
    assert ea.path != eb.path and len(entry_names(cache)) == 2

    st = os.stat(a.images[2])
    os.utime(a.images[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ea2 = cache_subject(a, cache)
    assert not os.path.exists(ea.path)  # a's stale entry goes ...
    assert os.path.isfile(os.path.join(eb.path, "meta.json"))  # ... b's, same id but other files, stays
    assert entry_names(cache) == sorted(os.path.basename(p) for p in (ea2.path, eb.path))
    assert cache_subject(b, cache).path == eb.path  # and is still reused


def test_killed_build_is_ignored_and_cleaned_once_old(tmp_path):
    (subject,) = write_tiny_dataset(tmp_path / "data", n=1)
    cache = tmp_path / "cache"
    entry = cache_subject(subject, str(cache))
    name = os.path.basename(entry.path)
    shutil.rmtree(entry.path)
    # What a build killed before its rename leaves: a temporary folder, half-written, even with a meta.json.
    fresh, old = cache / f".tmp-{name}-fresh", cache / f".tmp-{name}-old"
    for tmp in (fresh, old):
        tmp.mkdir()
        (tmp / "image.npy").write_bytes(b"\0" * 100)
        (tmp / "meta.json").write_text(json.dumps(entry.meta))
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    (cache / name).mkdir()  # and a folder of our own key without meta.json: not an entry
    (cache / name / "image.npy").write_bytes(b"\0" * 10)
    rebuilt = cache_subject(subject, str(cache))
    assert rebuilt.path == entry.path
    image, _ = full_arrays(subject)
    np.testing.assert_array_equal(rebuilt.image(), image.astype(np.float16).astype(np.float32))
    assert fresh.exists() and not old.exists()  # a young one may be another process's build in progress
    assert entry_names(cache) == [name]


def test_failed_build_leaves_nothing(tmp_path):
    subjects = write_tiny_dataset(tmp_path / "data", n=2)
    data, affine, _ = read_nifti(subjects[1].images[3])
    write_nifti(subjects[1].images[3], np.zeros_like(data), affine)
    cache = tmp_path / "cache"
    with pytest.raises(CMFLError, match="all zero"):
        build_cache(discover(tmp_path / "data"), str(cache))
    left = sorted(os.listdir(cache))
    assert len(left) == 1 and left[0].startswith(subjects[0].subject_id)  # only the good subject, no temp dirs


def test_unlabelled_subject_is_cached_without_label(tmp_path):
    s = write_tiny_subject(tmp_path / "data", "brats2021", 0)
    os.remove(s.label)
    (u,) = discover(tmp_path / "data", require_labels=False)
    entry = cache_subject(u, str(tmp_path / "cache"))
    assert not entry.has_label
    with pytest.raises(CMFLError, match="no label map"):
        entry.label()


def test_size_estimate_announced_before_the_rest_is_built(tmp_path, caplog):
    write_tiny_dataset(tmp_path / "data", n=3)
    cache = tmp_path / "c"
    old = os.path.join(preprocessed_dir(str(cache)), "data-0123abcd", "Brats18_SYN_0000_1-0123456789abcdef")
    os.makedirs(old)  # a format-1 per-root folder: reported, not removed
    open(os.path.join(old, "meta.json"), "w").close()
    lines = []

    def announce(line):
        lines.append((line, len(entry_names(preprocessed_dir(str(cache))))))

    with caplog.at_level(logging.WARNING):
        entries = load_entries(data_config(tmp_path / "data", cache), announce=announce)
    (line, built), = lines
    per = entries[0].nbytes()
    assert built == 2  # the old folder and the first entry only
    assert f"{per / 1e6:.1f} MB per subject" in line and f"{3 * per / 1e6:.1f} MB for 3 subject(s)" in line
    assert os.path.isdir(old) and "no longer used" in caplog.text and "data-0123abcd" in caplog.text


@pytest.mark.parametrize("storage", ["float16", "npy"])
def test_the_estimate_before_a_build_counts_the_cropped_grid_in_the_storage_format(tmp_path, storage):
    """The notebook's room check before ``prepare``: the brain's cropped box at the storage's bytes per voxel, an
    estimate close to the entry later built (not 4 float32 channels of the whole grid)."""
    from cmfl_jax.data.cache_size import BYTES_PER_VOXEL, ENTRY_OVERHEAD, entry_bytes_estimate

    subject = write_tiny_subject(tmp_path / "data", "brats2018", 0)
    image = read_nifti(subject.images[0])[0]
    box = [(int(np.flatnonzero((image != 0).any(axis=tuple(a for a in range(3) if a != axis)))[[0, -1]] @ [-1, 1])
            + 1 + 2 * CROP_MARGIN) for axis in range(3)]
    cropped = int(np.prod([min(n, s) for n, s in zip(box, image.shape, strict=True)]))
    assert entry_bytes_estimate(image, storage) == cropped * BYTES_PER_VOXEL[storage] + ENTRY_OVERHEAD
    built = cache_subject(subject, str(tmp_path / "cache"), storage=storage).nbytes()
    assert 0.9 * built <= entry_bytes_estimate(image, storage) <= 1.5 * built  # the label compressed, or not
    # A BraTS subject (a brain box of 140 x 170 x 140 voxels in 240 x 240 x 155): about 35 MB as float16, so 1,251
    # subjects (BraTS 2021) need about 44 GB, not the 177 GiB of 17 bytes per voxel of the uncropped grid.
    brats = np.zeros((240, 240, 155), bool)
    brats[50:190, 35:205, 5:145] = True
    if storage == "float16":
        assert entry_bytes_estimate(brats, storage) == 148 * 178 * 148 * 9 + ENTRY_OVERHEAD
        assert 1251 * entry_bytes_estimate(brats, storage) < 45e9
