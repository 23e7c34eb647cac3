"""The size of the cache: an entry measured once built, or estimated before it exists (to check for room)."""

from __future__ import annotations

import shutil

import numpy as np

from cmfl_jax.data.cache import crop_box
from cmfl_jax.data.cached_subject import DEFAULT_STORAGE, CachedSubject

# Bytes per voxel of the cropped grid: 4 image channels as the storage writes them, plus the uint8 label (blosc2's
# compression counted as none). Plus, per entry, meta.json and the array headers; the tumour's index (8 bytes per
# tumour voxel, under 1 MB for a BraTS tumour) is left out.
BYTES_PER_VOXEL = {"float16": 4 * 2 + 1, "blosc2": 4 * 4 + 1, "npy": 4 * 4 + 1}
ENTRY_OVERHEAD = 4096


def entry_bytes_estimate(brain: np.ndarray, storage: str = DEFAULT_STORAGE) -> int:
    """The size of a subject's entry before it is built, from its brain mask (or one image's non-zero voxels):
    the cropped grid of :func:`crop_box` times the storage's bytes per voxel. Used where no entry exists yet to
    measure (the notebook's room check before ``prepare``)."""
    cropped = int(np.prod([hi - lo for lo, hi in crop_box(np.asarray(brain) != 0)]))
    return cropped * BYTES_PER_VOXEL[storage] + ENTRY_OVERHEAD


def estimate_line(first: CachedSubject, n: int, cache_dir: str) -> str:
    """One line: the size of the first entry, times ``n`` subjects, and the free space where the cache is."""
    per = first.nbytes()
    free = shutil.disk_usage(cache_dir).free
    return (f"cache: {_size(per)} per subject (its first entry), about {_size(per * n)} for {n} subject(s), "
            f"in {cache_dir} ({_size(free)} free)")


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"
