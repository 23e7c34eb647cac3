"""The pre-processed cache: contents, memory-mapping, rebuild on change, nothing half-written."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from cmfl_jax.data.cache import build_cache, cache_subject
from cmfl_jax.data.io import load_subject, read_nifti, write_nifti
from cmfl_jax.data.layouts import discover
from cmfl_jax.data.preprocess import preprocess_images
from cmfl_jax.errors import CMFLError

from .conftest import tiny_label, write_tiny_dataset, write_tiny_subject


def test_cache_holds_preprocessed_channels_last(tmp_path):
    (subject,) = write_tiny_dataset(tmp_path / "data", n=1)
    entry = cache_subject(subject, str(tmp_path / "cache"))
    image = entry.image()
    assert isinstance(image, np.memmap) and image.shape == (20, 22, 24, 4)
    expected = np.moveaxis(preprocess_images(load_subject(subject).images), 0, -1)
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(entry.label(), tiny_label())
    assert entry.meta["label_counts"] == {"0": 20 * 22 * 24 - 512, "1": 8, "2": 448, "4": 56}
    assert entry.meta["tumour_bbox"] == [[6, 14], [7, 15], [8, 16]]
    assert len(entry.tumour_index()) == 512


def test_cache_reused_then_rebuilt_when_source_or_settings_change(tmp_path):
    (subject,) = write_tiny_dataset(tmp_path / "data", n=1)
    cache = str(tmp_path / "cache")
    first = cache_subject(subject, cache)
    mtime = os.path.getmtime(os.path.join(first.path, "image.npy"))
    assert cache_subject(subject, cache).path == first.path
    assert os.path.getmtime(os.path.join(first.path, "image.npy")) == mtime  # reused, not rewritten

    data, affine, _ = read_nifti(subject.images[0])
    time.sleep(0.01)
    write_nifti(subject.images[0], data * 3, affine)
    second = cache_subject(subject, cache)
    assert second.path != first.path and not os.path.exists(first.path)  # stale entry removed
    assert os.listdir(cache) == [os.path.basename(second.path)]

    third = cache_subject(subject, cache, normalization="none")
    assert third.path != second.path
    np.testing.assert_array_equal(third.image()[..., 0], data * 3)


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
