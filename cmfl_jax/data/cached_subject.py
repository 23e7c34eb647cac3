"""One cached subject on disk: its arrays (``.npy`` memory maps or blosc2 chunks), read lazily, on the cropped grid.

The grain pipeline reads a patch per step from many threads; only the part a window touches is read.

Storage (``storage``, ``config.data.cache_storage``):

* ``"float16"`` (the default for z-scored data): the image as a float16 ``.npy``, memory-mapped, the label
  map in blosc2 chunks. The patch sampler reads the float16 window as it is (no decompression, half the
  bytes of float32) and the training steps get it as float32 on the device (exact). The z-scored values
  are rounded to float16 (relative error <= 2^-11, finer than bfloat16's 2^-8 that mixed precision uses).
* ``"blosc2"``: the float32 image and the label, lossless, LZ4 in 32^3-voxel chunks (a patch decompresses
  only the blocks it touches): the smallest, but a patch costs more time than from a memory map.
* ``"npy"``: float32 ``.npy`` files, memory-mapped: the fastest, twice the disk of ``"float16"``.

Sizes per subject and read times: docs/data.md and experiments/results/cache_benchmark.md (measured by
``experiments/cache_benchmark.py``, removed since; it is in the git history up to commit 36a1f11).
"""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np

from cmfl_jax.errors import CMFLError

STORAGES = ("float16", "blosc2", "npy")
DEFAULT_STORAGE = "float16"
# storage -> array name -> (file extension, dtype written; None: the array's own)
FILES = {"float16": {"image": (".npy", np.float16), "label": (".b2nd", None)},
         "blosc2": {"image": (".b2nd", None), "label": (".b2nd", None)},
         "npy": {"image": (".npy", None), "label": (".npy", None)}}
BLOSC2_CHUNKS = {"image": (32, 32, 32), "label": (32, 32, 32)}  # spatial; the channels stay in one chunk
# Blocks (blosc2's unit of decompression inside a chunk) of 16^3, no byte shuffle: the choice measured by
# experiments/cache_benchmark.py (removed; in the git history up to commit 36a1f11), its results in
# experiments/results/cache_benchmark.md.
BLOSC2_BLOCKS = (16, 16, 16)
BLOSC2_SHUFFLE = False
TUMOUR_FILE, META_FILE = "tumour_index.npy", "meta.json"
_NPY_HEADER_LOCK = threading.Lock()


def load_npy(path: str) -> np.ndarray:
    """``np.load(path, mmap_mode="r")``, one thread at a time: numpy parses the header with ``ast.literal_eval``,
    which CPython 3.11 before 3.11.8 can fail from concurrent threads ("AST constructor recursion depth
    mismatch"), as grain's reader threads did. The memory map itself is read without the lock."""
    with _NPY_HEADER_LOCK:
        return np.load(path, mmap_mode="r")


class LazyVolume:
    """A read-only array on disk that reads (decompresses) only the part that is indexed.

    Has ``shape``, ``ndim`` and ``dtype``; ``volume[index]`` and ``np.asarray(volume)`` give numpy arrays of
    that dtype. This is what ``CachedSubject.image()`` and ``.label()`` return for compressed entries, in place
    of the memory map of an ``.npy`` entry.
    """

    def __init__(self, array, dtype=None):
        self._array = array
        self.dtype = np.dtype(dtype or array.dtype)
        self.shape = tuple(int(n) for n in array.shape)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self._array[index], dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyVolume(shape={self.shape}, dtype={self.dtype})"


def check_storage(storage: str, normalization: str) -> None:
    """A known storage that can hold the intensities: float16 only after the z-score (raw MRI values reach
    tens of thousands, where float16's step is 16 or more)."""
    if storage not in STORAGES:
        raise CMFLError("config.data.cache_storage", f"unknown value {storage!r}; choose one of auto, "
                        f"{', '.join(STORAGES)}")
    if storage == "float16" and not normalization.startswith("zscore"):
        raise CMFLError("config.data.cache_storage", f"float16 holds z-scored intensities only, not normalization="
                        f"{normalization!r}; use blosc2 or npy (or auto)")


def storage_for(setting: str, normalization: str) -> str:
    """``config.data.cache_storage``: "auto" is float16 for z-scored data and lossless blosc2 otherwise."""
    if setting == "auto":
        return DEFAULT_STORAGE if normalization.startswith("zscore") else "blosc2"
    check_storage(setting, normalization)
    return setting


def write_array(path: str, array: np.ndarray, chunks: tuple[int, ...] | None = None,
                shuffle: bool | None = None) -> str:
    """Write ``array`` to ``path``: ``.npy`` as it is, ``.b2nd`` compressed; returns the path.

    blosc2: chunks of ``chunks`` spatial voxels in blocks of ``BLOSC2_BLOCKS``, LZ4, byte shuffle if ``shuffle``
    (default ``BLOSC2_SHUFFLE``). It compresses in memory and the frame is written with plain Python I/O, so a full
    disk raises an ``OSError`` that names the file (as ``np.save`` does).
    """
    if path.endswith(".npy"):
        np.save(path, array)
        return path
    import blosc2

    chunks = tuple(chunks or array.shape[:3]) + tuple(array.shape[3:])
    compressed = blosc2.asarray(
        np.ascontiguousarray(array), chunks=chunks,
        blocks=tuple(min(b, c) for b, c in zip(BLOSC2_BLOCKS, chunks, strict=False)) + tuple(chunks[3:]),
        cparams={"codec": blosc2.Codec.LZ4, "clevel": 5,
                 "filters": [blosc2.Filter.SHUFFLE if (BLOSC2_SHUFFLE if shuffle is None else shuffle)
                             else blosc2.Filter.NOFILTER]},
    )
    with open(path, "wb") as f:
        f.write(compressed.to_cframe())
    return path


def write_entry_array(folder: str, name: str, array: np.ndarray, storage: str) -> str:
    """Write the entry's array ``name`` ("image" or "label") in ``folder`` as ``storage`` keeps it."""
    extension, dtype = FILES[storage][name]
    array = array if dtype is None else array.astype(dtype)
    return write_array(os.path.join(folder, name + extension), array, BLOSC2_CHUNKS[name])


def open_array(path: str, dtype=None):
    """The array at ``path`` (``.npy``: a read-only memory map; ``.b2nd``: a :class:`LazyVolume`), read as ``dtype``."""
    if path.endswith(".npy"):
        array = load_npy(path)
        return array if dtype is None or array.dtype == dtype else LazyVolume(array, dtype)
    import blosc2

    return LazyVolume(blosc2.open(path, mode="r"), dtype)


@dataclasses.dataclass(frozen=True)
class CachedSubject:
    """A pre-processed subject on disk; ``meta`` holds shapes, crop, spacing, affine, label counts, bounding boxes."""

    path: str
    meta: dict

    @property
    def subject_id(self) -> str:
        return self.meta["subject_id"]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The cropped grid's shape (``meta["full_shape"]`` is the source's)."""
        return tuple(self.meta["shape"])  # type: ignore[return-value]

    @property
    def has_label(self) -> bool:
        return self.meta["has_label"]

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name + FILES[self.meta["storage"]][name][0])

    def image(self):
        """``(D, H, W, 4)`` float32 on the cropped grid (channels last, the models' layout), read lazily."""
        return open_array(self._file("image"), np.float32)

    def stored_image(self):
        """The image as stored (float16 or float32), read lazily: the patch sampler's windows skip the cast, which
        numpy does slowly; the steps cast on the device."""
        return open_array(self._file("image"))

    def label(self):
        """``(D, H, W)`` uint8 in 0/1/2/4 on the cropped grid, read lazily."""
        if not self.has_label:
            raise CMFLError(self.path, f"subject {self.subject_id} has no label map")
        return open_array(self._file("label"), np.uint8)

    def tumour_index(self) -> np.ndarray:
        """Flat indices (cropped grid) of the tumour voxels (label > 0), for sampling patch centres in the tumour."""
        return load_npy(os.path.join(self.path, TUMOUR_FILE))

    def nbytes(self) -> int:
        """Bytes the entry takes on disk."""
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in os.listdir(self.path))


def uncrop(array, entry: CachedSubject) -> np.ndarray:
    """``array`` on ``entry``'s cropped grid (trailing axes kept) put back on the full grid, zero outside the crop."""
    array = np.asarray(array)
    if tuple(array.shape[:3]) != entry.shape:
        raise ValueError(f"array of shape {array.shape} is not on the cropped grid {entry.shape} of {entry.path}")
    out = np.zeros((*entry.meta["full_shape"], *array.shape[3:]), array.dtype)
    out[tuple(slice(o, o + n) for o, n in zip(entry.meta["crop_offset"], entry.shape, strict=True))] = array
    return out
