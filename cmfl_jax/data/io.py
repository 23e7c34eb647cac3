"""NIfTI reading and writing with the checks that turn bad files into one clear error.

Every problem found here raises :class:`cmfl_jax.errors.CMFLError` naming the file.
Writes are atomic: a temporary name in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import tempfile
import zlib

import nibabel as nib
import numpy as np

from cmfl_jax.data.subject import MODALITIES, Subject, to_internal
from cmfl_jax.errors import CMFLError
from cmfl_jax.label_sets import check_values

AFFINE_TOLERANCE = 1e-3  # mm; BraTS modalities are co-registered, so their affines agree to float precision.


@dataclasses.dataclass
class LoadedSubject:
    """A subject's raw arrays: ``images`` (4, D, H, W) float32, ``label`` (D, H, W) uint8 in internal tissues
    (0/1/2/4, plus 3 and 5 for the 2024 sets: :mod:`cmfl_jax.label_sets`)."""

    subject: Subject
    images: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    header: nib.Nifti1Header

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in self.header.get_zooms()[:3])  # type: ignore[return-value]


def read_nifti(path: str) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read one 3D NIfTI: (data as stored, affine, header). A trailing singleton 4th axis is dropped."""
    if not os.path.isfile(path):
        raise CMFLError(path, "file not found")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError) as e:
        raise CMFLError(path, f"unreadable or truncated NIfTI ({type(e).__name__}: {e})") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CMFLError(path, f"expected a 3D volume, got shape {tuple(data.shape)}")
    return data, np.asarray(img.affine, dtype=np.float64), img.header


def _check_finite(path: str, data: np.ndarray) -> None:
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise CMFLError(path, f"{bad} voxel(s) are NaN or Inf")


def load_subject(subject: Subject, with_label: bool = True) -> LoadedSubject:
    """Read and check a subject: shapes and affines agree, values finite, no empty modality, valid labels."""
    volumes = []
    ref_path, ref_affine, ref_header, ref_shape = None, None, None, None
    for path, name in zip(subject.images, MODALITIES, strict=True):
        data, affine, header = read_nifti(path)
        _check_finite(path, data)
        if not np.any(data):
            raise CMFLError(path, f"modality {name} is all zero")
        if ref_shape is None:
            ref_path, ref_affine, ref_header, ref_shape = path, affine, header, data.shape
        else:
            _check_same_grid(path, data.shape, affine, ref_path, ref_shape, ref_affine)
        volumes.append(data.astype(np.float32))
    images = np.stack(volumes)

    label = None
    if with_label and subject.label is not None:
        raw, affine, _ = read_nifti(subject.label)
        _check_same_grid(subject.label, raw.shape, affine, ref_path, ref_shape, ref_affine)
        _check_finite(subject.label, raw)
        if np.issubdtype(raw.dtype, np.floating) and np.any(raw != np.round(raw)):
            raise CMFLError(subject.label, "label map has non-integer values")
        check_values(subject.label, np.unique(raw).astype(np.int64), subject.labels)
        label = to_internal(raw, subject.labels)
    return LoadedSubject(subject, images, label, ref_affine, ref_header)


def _check_same_grid(path, shape, affine, ref_path, ref_shape, ref_affine) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise CMFLError(path, f"shape {tuple(shape)} differs from {tuple(ref_shape)} of {os.path.basename(ref_path)}")
    if not np.allclose(affine, ref_affine, atol=AFFINE_TOLERANCE, rtol=0):
        diff = float(np.max(np.abs(affine - ref_affine)))
        raise CMFLError(path, f"affine differs from {os.path.basename(ref_path)} by up to {diff:.4g}")


def read_json(path: str) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (a marker or meta not written yet)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to ``path`` (same suffix); rename it onto ``path`` only on success."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=f"-{name}", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_nifti(path: str, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> None:
    """Write a NIfTI atomically, keeping the given affine and header (data type follows ``data``)."""
    img = nib.Nifti1Image(np.asarray(data), affine, header=header)
    img.set_data_dtype(np.asarray(data).dtype)
    with atomic_path(path) as tmp:
        # The suffix after the temporary prefix ends in .nii.gz, so nibabel compresses as for `path`.
        nib.save(img, tmp)
