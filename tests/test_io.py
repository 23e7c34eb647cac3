"""NIfTI loading, pre-processing, and the one-line errors for every kind of bad input."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from cmfl_jax.data.io import load_subject, read_nifti, write_nifti
from cmfl_jax.data.layouts import discover
from cmfl_jax.data.preprocess import preprocess_images, zscore_brain
from cmfl_jax.errors import CMFLError

from .conftest import TINY_SHAPE, tiny_label, write_tiny_subject


def test_zscore_brain_voxels_mean0_std1():
    rng = np.random.default_rng(1)
    volume = (rng.gamma(2.0, 50.0, size=(30, 30, 30)) + 1).astype(np.float32)
    volume[:10] = 0
    out = zscore_brain(volume)
    brain = volume != 0
    assert abs(out[brain].mean()) < 1e-5
    assert abs(out[brain].std() - 1) < 1e-5
    assert np.all(out[~brain] == 0)
    stacked = preprocess_images(np.stack([volume, np.where(brain, 2 * volume + 7, 0)]))
    np.testing.assert_allclose(stacked[0], stacked[1], atol=1e-5)  # z-score removes scale and shift


def test_zscore_clip_clips_to_the_brains_percentiles_first():
    """1000 brain voxels 1..1000 and one outlier of 1e6: clipped to numpy's 0.5/99.5 percentiles of those 1001 values
    (linear interpolation: 6.0 and 996.0), then z-scored; the outlier becomes the top of the clipped range."""
    volume = np.zeros((11, 11, 11), np.float32)
    values = np.append(np.arange(1, 1001, dtype=np.float32), 1e6)
    volume.flat[: values.size] = values
    clipped = np.clip(values.astype(np.float64), 6.0, 996.0)
    assert np.percentile(values.astype(np.float64), [0.5, 99.5]).tolist() == [6.0, 996.0]
    expected = (clipped - clipped.mean()) / clipped.std()
    out = preprocess_images(volume[None], "zscore_clip")[0]
    np.testing.assert_allclose(out.flat[: values.size], expected, rtol=1e-5)
    assert out.flat[values.size - 1] == out.flat[values.size - 5]  # 1e6 and 997 both clipped to 996
    assert np.all(out.flat[values.size:] == 0)
    assert np.argmax(zscore_brain(volume).flat) == values.size - 1 and zscore_brain(volume).max() > 30  # unclipped


def test_write_read_keeps_data_affine_and_header(tmp_path):
    # NIfTI stores the affine in float32: these values are exact there, so the round trip must be exact.
    affine = np.array([[-1.25, 0, 0, 90.5], [0, -1.0, 0.015625, 126.0], [0, 0, 2.5, -72.0], [0, 0, 0, 1]])
    data = np.random.default_rng(0).normal(size=(7, 8, 9)).astype(np.float32)
    path = str(tmp_path / "x.nii.gz")
    write_nifti(path, data, affine)
    back, back_affine, header = read_nifti(path)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_array_equal(back_affine, affine)
    np.testing.assert_allclose(header.get_zooms()[:3], np.sqrt((affine[:3, :3] ** 2).sum(0)), rtol=1e-6)
    assert [f for f in os.listdir(tmp_path)] == ["x.nii.gz"]  # no temporary file left


def test_subject_round_trip(tmp_path):
    s = write_tiny_subject(tmp_path, "brats2023", 0)
    loaded = load_subject(s)
    assert loaded.images.shape == (4, *TINY_SHAPE) and loaded.images.dtype == np.float32
    np.testing.assert_array_equal(loaded.label, tiny_label())  # ET stored as 3, read back as 4
    assert set(np.unique(nib.load(s.label).get_fdata()).astype(int)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(loaded.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert loaded.spacing == (1.0, 1.0, 1.0)


def _corrupt(subject, kind):
    """Damage one file of a subject; returns the path of the damaged file."""
    t1ce, label = subject.images[1], subject.label
    if kind == "missing":
        os.remove(t1ce)
        return os.path.dirname(t1ce)
    if kind == "truncated":
        blob = open(t1ce, "rb").read()
        open(t1ce, "wb").write(blob[: len(blob) // 2])
        return t1ce
    if kind == "not_gzip":
        open(t1ce, "wb").write(b"this is not a NIfTI file")
        return t1ce
    data, affine, _ = read_nifti(t1ce)
    if kind == "4d":
        write_nifti(t1ce, np.stack([data, data], -1), affine)
    elif kind == "2d":
        write_nifti(t1ce, data[:, :, 0], affine)
    elif kind == "shape":
        write_nifti(t1ce, data[:-1], affine)
    elif kind == "affine":
        shifted = affine.copy()
        shifted[0, 3] += 0.5
        write_nifti(t1ce, data, shifted)
    elif kind == "nan":
        data = data.copy()
        data[5, 5, 5] = np.nan
        write_nifti(t1ce, data, affine)
    elif kind == "inf":
        data = data.copy()
        data[5, 5, 5] = np.inf
        write_nifti(t1ce, data, affine)
    elif kind == "zero":
        write_nifti(t1ce, np.zeros_like(data), affine)
    elif kind == "labels":
        lab = tiny_label()
        lab[0, 0, 0] = 3  # 3 is not a BraTS 2018 label
        write_nifti(label, lab, affine)
        return label
    return t1ce


BAD = {
    "missing": "missing modality t1ce",
    "truncated": "unreadable or truncated",
    "not_gzip": "unreadable or truncated",
    "4d": "expected a 3D volume, got shape (20, 22, 24, 2)",
    "2d": "expected a 3D volume, got shape (20, 22)",
    "shape": "shape (19, 22, 24) differs",
    "affine": "affine differs",
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
    "zero": "all zero",
    "labels": "label values [3] outside brats2021 (0/1/2/4)",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_names_file_and_problem(tmp_path, kind):
    subject = write_tiny_subject(tmp_path, "brats2018", 0)
    where = _corrupt(subject, kind)
    with pytest.raises(CMFLError) as e:
        for s in discover(tmp_path):
            load_subject(s)
    message = str(e.value)
    assert message.startswith(where + ": "), message
    assert BAD[kind] in message
    assert "\n" not in message


def test_small_affine_difference_is_tolerated(tmp_path):
    subject = write_tiny_subject(tmp_path, "brats2018", 0)
    data, affine, _ = read_nifti(subject.images[2])
    affine = affine.copy()
    affine[1, 3] += 1e-5  # float noise from another writer
    write_nifti(subject.images[2], data, affine)
    assert load_subject(subject).images.shape[0] == 4


def test_gzip_of_garbage_is_reported(tmp_path):
    subject = write_tiny_subject(tmp_path, "brats2018", 0)
    with gzip.open(subject.images[0], "wb") as f:
        f.write(b"\0" * 400)
    with pytest.raises(CMFLError, match=r"t1\.nii\.gz: unreadable"):
        load_subject(subject)


def test_written_files_get_the_usual_permissions(tmp_path):
    path = str(tmp_path / "p.nii.gz")
    umask = os.umask(0o022)
    try:
        write_nifti(path, np.ones((2, 2, 2), np.float32), np.eye(4))
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644
