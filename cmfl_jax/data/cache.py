"""Cache of pre-processed subjects as uncompressed ``.npy``, memory-mapped on read.

Decompressing four 240x240x155 NIfTI files costs ~1 s per subject; the sampler draws a
patch every step, so it reads from this cache instead. Each subject lives in
``<cache_dir>/<subject_id>-<key>/`` where ``key`` hashes the source files' paths, sizes
and modification times and the pre-processing settings: changing either gives a new key,
so the entry is rebuilt (and the stale one removed). Entries are written to a temporary
folder and renamed into place, so a killed build never leaves a half-written entry.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile

import numpy as np

from cmfl_jax.data.io import load_subject
from cmfl_jax.data.layouts import INTERNAL_LABELS, Subject
from cmfl_jax.data.preprocess import PREPROCESS_VERSION, preprocess_images
from cmfl_jax.errors import CMFLError
from cmfl_jax.progress import progress

CACHE_FORMAT = 1
_IMAGE, _LABEL, _TUMOUR, _META = "image.npy", "label.npy", "tumour_index.npy", "meta.json"


@dataclasses.dataclass(frozen=True)
class CachedSubject:
    """A pre-processed subject on disk; ``meta`` holds shape, spacing, affine, label counts, bounding boxes."""

    path: str
    meta: dict

    @property
    def subject_id(self) -> str:
        return self.meta["subject_id"]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])  # type: ignore[return-value]

    @property
    def has_label(self) -> bool:
        return self.meta["has_label"]

    def image(self) -> np.ndarray:
        """``(D, H, W, 4)`` float32, memory-mapped (channels last, the models' layout)."""
        return np.load(os.path.join(self.path, _IMAGE), mmap_mode="r")

    def label(self) -> np.ndarray:
        """``(D, H, W)`` uint8 in 0/1/2/4, memory-mapped."""
        if not self.has_label:
            raise CMFLError(self.path, f"subject {self.subject_id} has no label map")
        return np.load(os.path.join(self.path, _LABEL), mmap_mode="r")

    def tumour_index(self) -> np.ndarray:
        """Flat indices of the tumour voxels (label > 0), for sampling patch centres in the tumour."""
        return np.load(os.path.join(self.path, _TUMOUR), mmap_mode="r")


def default_cache_dir() -> str:
    """``$CMFL_JAX_CACHE`` or ``~/.cache/cmfl_jax``."""
    return os.environ.get("CMFL_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cmfl_jax")


def cache_key(subject: Subject, normalization: str) -> str:
    """Hash of the sources (path, size, mtime) and the pre-processing settings."""
    sources = []
    for path in (*subject.images, subject.label):
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError as e:
            raise CMFLError(path, f"cannot read file ({e.strerror})") from e
        sources.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
    settings = {"normalization": normalization, "preprocess": PREPROCESS_VERSION, "format": CACHE_FORMAT}
    blob = json.dumps({"sources": sources, "settings": settings, "et": subject.et_label}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _bbox(mask: np.ndarray) -> list[list[int]] | None:
    """[[lo, hi), ...] per axis of the non-zero voxels, or None if empty."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        box.append([int(nz[0]), int(nz[-1]) + 1])
    return box


def _build_entry(subject: Subject, final: str, key: str, normalization: str) -> None:
    loaded = load_subject(subject)
    images = preprocess_images(loaded.images, normalization)
    brain = np.any(loaded.images != 0, axis=0)
    meta = {
        "subject_id": subject.subject_id,
        "layout": subject.layout,
        "grade": subject.grade,
        "et_label": subject.et_label,
        "sources": {"images": list(subject.images), "label": subject.label},
        "key": key,
        "normalization": normalization,
        "shape": list(images.shape[1:]),
        "spacing": list(loaded.spacing),
        "affine": loaded.affine.tolist(),
        "brain_bbox": _bbox(brain),
        "has_label": loaded.label is not None,
    }
    parent = os.path.dirname(final)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=parent)
    try:
        np.save(os.path.join(tmp, _IMAGE), np.ascontiguousarray(np.moveaxis(images, 0, -1)))
        if loaded.label is not None:
            label = loaded.label
            np.save(os.path.join(tmp, _LABEL), label)
            np.save(os.path.join(tmp, _TUMOUR), np.flatnonzero(label > 0).astype(np.int64))
            counts = np.bincount(label.ravel(), minlength=5)
            meta["label_counts"] = {str(v): int(counts[v]) for v in INTERNAL_LABELS}
            meta["tumour_bbox"] = _bbox(label > 0)
        with open(os.path.join(tmp, _META), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # another process may have built it first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_subject(subject: Subject, cache_dir: str, normalization: str = "zscore_brain") -> CachedSubject:
    """The cache entry of ``subject``, built if missing or stale."""
    key = cache_key(subject, normalization)
    final = os.path.join(cache_dir, f"{subject.subject_id}-{key}")
    if not os.path.isfile(os.path.join(final, _META)):
        os.makedirs(cache_dir, exist_ok=True)
        prefix = f"{subject.subject_id}-"
        for stale in glob.glob(os.path.join(glob.escape(cache_dir), glob.escape(prefix) + "*")):
            if re.fullmatch(r"[0-9a-f]{16}", os.path.basename(stale)[len(prefix) :]):
                shutil.rmtree(stale, ignore_errors=True)
        _build_entry(subject, final, key, normalization)
    with open(os.path.join(final, _META)) as f:
        return CachedSubject(final, json.load(f))


def cache_dir_for(data_root: str, base: str | None = None) -> str:
    """One cache folder per data root, so equal subject ids from two roots never collide."""
    root_hash = hashlib.sha256(os.path.abspath(data_root).encode()).hexdigest()[:8]
    name = os.path.basename(os.path.normpath(data_root)) or "root"
    return os.path.join(base or default_cache_dir(), "preprocessed", f"{name}-{root_hash}")


def build_cache(
    subjects: list[Subject], cache_dir: str, normalization: str = "zscore_brain", desc: str = "caching"
) -> list[CachedSubject]:
    """Validate and cache every subject (with a progress bar); entries already valid are reused."""
    return [cache_subject(s, cache_dir, normalization) for s in progress(subjects, desc=desc)]
