"""Cache of pre-processed subjects, cropped to the brain and compressed in chunks, read a window at a time.

Decompressing four 240x240x155 NIfTI files costs far more than a patch read; the sampler draws a patch every
step, so it reads from this cache instead. Each entry keeps the subject cropped to its brain's bounding
box (voxels where any modality is non-zero, together with any labelled voxel) plus ``CROP_MARGIN``
voxels: everything outside that box is 0 in every channel (the z-score leaves the background at exactly
0), so nothing is lost, and :func:`uncrop` puts an array back on the full grid. ``meta.json`` holds the
cropped ``shape``, the ``full_shape`` and the ``crop_offset``; every coordinate in an entry (its arrays,
``brain_bbox``, ``tumour_bbox``, ``tumour_index``) is on the cropped grid. ``label_counts`` count the full
grid. Storage (a float16 memory map by default, blosc2 chunks or float32 ``.npy``) and reading:
:mod:`cmfl_jax.data.cached_subject`.

All entries live in one folder, ``<cache_dir>/preprocessed/``, as ``<subject_id>-<key>/``, where ``key``
hashes the source files' real paths (symbolic links resolved), sizes and modification times and the
settings: a CSV root and a folder root over the same files share their entries, and changing a file or
a setting gives a new key, so the entry is rebuilt. The stale entry (same id, same files, another key) is
removed then, but only one that was built from the same files (``meta["sources"]``) with the same
normalization and storage: an entry of another subject with the same id from another root stays, and so
does the entry of another normalization or storage, which runs sharing the cache may be reading. Entries are
written to a temporary folder and renamed into place, so a killed build never leaves a half-written entry (its
temporary folder is ignored, and removed once old).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time

import numpy as np
from absl import logging

from cmfl_jax.data.cached_subject import (
    DEFAULT_STORAGE,
    META_FILE,
    TUMOUR_FILE,
    CachedSubject,
    check_storage,
    write_entry_array,
)
from cmfl_jax.data.io import load_subject, read_json
from cmfl_jax.data.layouts import Subject
from cmfl_jax.data.preprocess import PREPROCESS_VERSION, preprocess_images
from cmfl_jax.errors import CMFLError
from cmfl_jax.progress import progress

# 2: cropped to the brain, blosc2, one folder for every root; 3: 16^3 blocks, no shuffle; 4: storage "float16"
CACHE_FORMAT = 4
CROP_MARGIN = 4  # voxels of background kept on each side of the brain's bounding box
_TMP_PREFIX = ".tmp-"
_TMP_MAX_AGE_S = 3600.0  # a temporary folder this old is a killed build's: a build takes seconds
_ENTRY_NAME = re.compile(r".+-[0-9a-f]{16}")


def default_cache_dir() -> str:
    """``$CMFL_JAX_CACHE`` or ``~/.cache/cmfl_jax``."""
    return os.environ.get("CMFL_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cmfl_jax")


def preprocessed_dir(base: str | None = None) -> str:
    """The one folder of pre-processed entries, shared by every data root: ``<base>/preprocessed``."""
    return os.path.join(base or default_cache_dir(), "preprocessed")


def _sources(subject: Subject) -> dict:
    """The real paths of the subject's files (what ``meta["sources"]`` records)."""
    return {"images": [os.path.realpath(p) for p in subject.images],
            "label": os.path.realpath(subject.label) if subject.label is not None else None}


def cache_key(subject: Subject, normalization: str, storage: str = DEFAULT_STORAGE) -> str:
    """Hash of the sources (real path, size, mtime) and the pre-processing and storage settings."""
    sources = []
    for path in (*subject.images, subject.label):
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError as e:
            raise CMFLError(path, f"cannot read file ({e.strerror})") from e
        sources.append((os.path.realpath(path), st.st_size, st.st_mtime_ns))
    settings = {"normalization": normalization, "preprocess": PREPROCESS_VERSION, "format": CACHE_FORMAT,
                "storage": storage, "margin": CROP_MARGIN}
    # The older sets keep their old key ("et"), so their entries stay valid; the others add their name.
    labels = {"et": subject.et_label} if subject.label_set in ("brats2021", "brats2023") else {
        "label_set": subject.label_set}
    blob = json.dumps({"sources": sources, "settings": settings, **labels}, sort_keys=True)
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


def crop_box(mask: np.ndarray, margin: int = CROP_MARGIN) -> list[list[int]]:
    """The bounding box of ``mask`` grown by ``margin`` voxels and clipped to the grid; the whole grid if empty."""
    box = _bbox(mask) or [[0, n] for n in mask.shape]
    return [[max(lo - margin, 0), min(hi + margin, n)] for (lo, hi), n in zip(box, mask.shape, strict=True)]


def _build_entry(subject: Subject, final: str, key: str, normalization: str, storage: str) -> None:
    loaded = load_subject(subject)
    images = preprocess_images(loaded.images, normalization)
    brain = np.any(loaded.images != 0, axis=0)
    keep = brain if loaded.label is None else brain | (loaded.label > 0)
    box = crop_box(keep)
    window = tuple(slice(lo, hi) for lo, hi in box)
    meta = {
        "format": CACHE_FORMAT,
        "subject_id": subject.subject_id,
        "layout": subject.layout,
        "grade": subject.grade,
        "et_label": subject.et_label,
        "label_set": subject.label_set,
        "sources": _sources(subject),
        "key": key,
        "normalization": normalization,
        "storage": storage,
        "shape": [hi - lo for lo, hi in box],
        "full_shape": list(brain.shape),
        "crop_offset": [lo for lo, _ in box],
        "spacing": list(loaded.spacing),
        "affine": loaded.affine.tolist(),
        "brain_bbox": _bbox(brain[window]),
        "has_label": loaded.label is not None,
    }
    parent = os.path.dirname(final)
    tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.path.basename(final)}-", dir=parent)
    try:
        image = np.ascontiguousarray(np.moveaxis(images, 0, -1)[window])
        del images
        write_entry_array(tmp, "image", image, storage)
        if loaded.label is not None:
            label = np.ascontiguousarray(loaded.label[window])
            write_entry_array(tmp, "label", label, storage)
            index_dtype = np.int32 if label.size < 2**31 else np.int64
            np.save(os.path.join(tmp, TUMOUR_FILE), np.flatnonzero(label > 0).astype(index_dtype))
            counts = np.bincount(loaded.label.ravel(), minlength=256)  # the full grid, background included
            meta["label_counts"] = {str(v): int(counts[v]) for v in subject.labels.classes}  # internal tissues
            meta["tumour_bbox"] = _bbox(label > 0)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, META_FILE)):  # another process may have built it first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_meta(folder: str) -> dict | None:
    return read_json(os.path.join(folder, META_FILE))


def _remove_stale(cache_dir: str, subject: Subject, name: str, normalization: str, storage: str) -> None:
    """Remove the entries of this subject id built from the same files and settings under another key (files
    changed since, or an older format), and temporary folders of killed builds. Entries of the same id from
    other files, or of another normalization or storage (another run may be reading them), stay."""
    prefix, sources = f"{subject.subject_id}-", _sources(subject)
    now = time.time()
    for other in os.listdir(cache_dir):
        path = os.path.join(cache_dir, other)
        if other.startswith(_TMP_PREFIX):
            try:
                if now - os.path.getmtime(path) > _TMP_MAX_AGE_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass  # removed meanwhile by another process
        elif other != name and other.startswith(prefix) and re.fullmatch(r"[0-9a-f]{16}", other[len(prefix):]):
            meta = _read_meta(path)
            if (meta is not None and meta.get("sources") == sources and meta.get("normalization") == normalization
                    and meta.get("storage") == storage):
                shutil.rmtree(path, ignore_errors=True)


def cache_subject(subject: Subject, cache_dir: str, normalization: str = "zscore_brain",
                  storage: str = DEFAULT_STORAGE) -> CachedSubject:
    """The cache entry of ``subject`` in ``cache_dir`` (see :func:`preprocessed_dir`), built if missing or stale.

    ``meta``'s ``subject_id``, ``layout`` and ``grade`` are the given subject's, whichever root built the entry.
    """
    check_storage(storage, normalization)
    key = cache_key(subject, normalization, storage)
    name = f"{subject.subject_id}-{key}"
    final = os.path.join(cache_dir, name)
    meta = _read_meta(final)
    if meta is None:
        os.makedirs(cache_dir, exist_ok=True)
        # The same files under another id (a CSV naming them differently): the key covers the files, so reuse it.
        same = [f for f in os.listdir(cache_dir) if f.endswith(f"-{key}") and not f.startswith(_TMP_PREFIX)]
        meta = next((m for m in (_read_meta(os.path.join(cache_dir, f)) for f in same) if m is not None), None)
        if meta is not None:
            final = os.path.join(cache_dir, f"{meta['subject_id']}-{key}")
        else:
            _remove_stale(cache_dir, subject, name, normalization, storage)
            if os.path.isdir(final):  # our own key without meta.json: not a finished entry
                shutil.rmtree(final, ignore_errors=True)
            _build_entry(subject, final, key, normalization, storage)
            meta = _read_meta(final)
            if meta is None:
                raise CMFLError(final, "cache entry has no readable meta.json")
    meta.update(subject_id=subject.subject_id, layout=subject.layout, grade=subject.grade,
                label_set=subject.label_set)
    return CachedSubject(final, meta)


def _warn_old_folders(cache_dir: str) -> None:
    """Format 1 kept one folder per data root inside ``preprocessed/``; say they are unused now (not removed)."""
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return
    old = [os.path.join(cache_dir, n) for n in names
           if not n.startswith(_TMP_PREFIX) and not _ENTRY_NAME.fullmatch(n) and re.fullmatch(r".+-[0-9a-f]{8}", n)
           and os.path.isdir(os.path.join(cache_dir, n)) and not os.path.exists(os.path.join(cache_dir, n, META_FILE))]
    if old:
        size = sum(os.path.getsize(os.path.join(d, f)) for o in old for d, _, fs in os.walk(o) for f in fs)
        logging.warning("%d folder(s) of an older cache format in %s are no longer used (%.1f GB): delete them "
                        "to free the space: %s", len(old), cache_dir, size / 1e9, ", ".join(sorted(old)))


def build_cache(
    subjects: list[Subject], cache_dir: str, normalization: str = "zscore_brain", desc: str = "caching",
    storage: str = DEFAULT_STORAGE,
) -> list[CachedSubject]:
    """Validate and cache every subject (with a progress bar); entries already valid are reused."""
    _warn_old_folders(cache_dir)
    return [cache_subject(s, cache_dir, normalization, storage) for s in progress(subjects, desc=desc)]
