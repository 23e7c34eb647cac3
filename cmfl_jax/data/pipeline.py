"""The grain pipeline: random patches from cached subjects, deterministic given the seed.

One element per step: a subject drawn by a seeded shuffle that repeats for ever, then a
patch whose centre voxel is a tumour voxel with probability ``tumour_prob`` (1.0 is the
paper's "patches sampled within the tumour area"), else any brain voxel. The patch is
centred exactly on that voxel; whatever falls outside the volume is zero (background after
z-scoring), which also pads volumes smaller than the patch. With several hosts each takes every
``shard_count``-th patch of that one stream (``shard``), so the hosts together see what one host would.
The iterator's state (``get_state``/``set_state``) goes into checkpoints, so a resumed run continues
the same sequence of patches. Augmentation (``config.data.augment``, :mod:`cmfl_jax.data.augment`) is off in
the paper's recipe; when on it draws from the same per-element ``rng``, so it resumes too. With
``augment.where="device"`` the element carries the plain patch or a window to resample, and the drawn numbers
(``augment``, :mod:`cmfl_jax.data.device_inputs`); the training loop transforms it on the device.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from cmfl_jax.data.augment import apply_voxelwise, resolve_augment, turned_patch
from cmfl_jax.data.cached_subject import CachedSubject
from cmfl_jax.data.device_inputs import packed, stack_patches, window_reach, window_shape, window_start
from cmfl_jax.errors import CMFLError

# grain's read-ahead per process (each worker has its own): patches cut by READ_THREADS threads, at most
# max(READ_THREADS, READ_AHEAD_BATCHES x batch) in flight or waiting. grain's default holds 500 patches: 1.1 GB at
# 64^3 and ~9.4 GB at 128^3 (17 GB augmented, float32), filled at start while the first step needs the cores.
READ_THREADS = 2
READ_AHEAD_BATCHES = 2


def crop_centered(volume: np.ndarray, centre: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The ``size`` window of ``volume`` whose element ``size // 2`` is ``centre``; zero outside the volume.

    ``volume`` is ``(D, H, W, ...)``; trailing axes are kept. Reads only the window, so a
    memory-mapped volume is not loaded whole.
    """
    out = np.zeros((*size, *volume.shape[3:]), dtype=volume.dtype)
    src, dst = [], []
    for c, s, n in zip(centre, size, volume.shape[:3], strict=True):
        lo = int(c) - s // 2
        a, b = max(lo, 0), min(lo + s, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[tuple(dst)] = volume[tuple(src)]
    return out


class PatchSampler(grain.transforms.RandomMap):
    """Cut one random patch (image, label, centre) out of a cached subject, augmented as ``augment`` says.

    ``augment`` is ``config.data.augment`` (:func:`cmfl_jax.data.augment.resolve_augment`); ``flip`` is the older
    switch for mirroring, ``p_mirror=0.5``. ``extent``: the largest volume shape, which bounds the window a
    ``where="device"`` resample ships.
    """

    def __init__(self, patch_size: Sequence[int], tumour_prob: float = 1.0, flip: bool = False,
                 augment: Mapping | None = None, extent: Sequence[int] | None = None):
        self.patch_size = tuple(int(p) for p in patch_size)
        self.tumour_prob = float(tumour_prob)
        self.augment = resolve_augment(augment, flip)
        self.on_device = self.augment.on and self.augment.where == "device"
        self.window = window_shape(self.augment, self.patch_size, extent) if self.on_device else None
        self.reach = window_reach(self.augment, self.patch_size) if self.on_device else None

    def _centre(self, entry: CachedSubject, rng: np.random.Generator) -> np.ndarray:
        tumour = entry.tumour_index() if entry.has_label else None
        if tumour is not None and len(tumour) and rng.random() < self.tumour_prob:
            return np.array(np.unravel_index(int(tumour[rng.integers(len(tumour))]), entry.shape))
        box = entry.meta["brain_bbox"] or [[0, n] for n in entry.shape]
        return np.array([rng.integers(lo, hi) for lo, hi in box])

    def _crop(self, volume, centre: np.ndarray, matrix: np.ndarray | None, order: int) -> np.ndarray:
        """The patch of ``volume`` at ``centre``; with ``matrix``, turned around it (a window resampled)."""
        if matrix is None:
            return crop_centered(volume, centre, self.patch_size)
        return turned_patch(volume, centre, matrix, self.patch_size, order)

    def random_map(self, element: tuple[int, CachedSubject], rng: np.random.Generator) -> dict:
        index, entry = element
        centre = self._centre(entry, rng)
        # Drawn after the centre and only when on: with augmentation off the stream is the plain one. Off, or on the
        # device, the image is read as stored (float16 by default; cast on the device); on the host, as float32.
        volume = entry.image() if self.augment.on and not self.on_device else entry.stored_image()
        draws = self.augment.draw(rng, volume.shape[-1]) if self.augment.on else {}
        if self.on_device:
            return self._for_device(index, entry, volume, centre, draws)
        matrix = draws.get("matrix")
        image = self._crop(volume, centre, matrix, self.augment.image_order)
        if entry.has_label:
            label = self._crop(entry.label(), centre, matrix, 0)
        else:
            label = np.zeros(self.patch_size, np.uint8)
        if draws:
            image, label = apply_voxelwise(draws, image, label)
        return {
            "image": image,  # (P, P, P, 4) as the cache stores it (float16 by default); float32 with augmentation
            "label": label,  # (P, P, P) uint8, 0/1/2/4
            "subject_index": np.int32(index),
            "centre": centre.astype(np.int32),
        }

    def _for_device(self, index: int, entry: CachedSubject, volume, centre: np.ndarray, draws: dict) -> dict:
        """The plain patch, or the window around it when ``draws`` resample, as stored; the draws as arrays."""
        size = np.array(self.window if "matrix" in draws else self.patch_size)
        start = window_start(centre, self.reach, size, entry.shape) if "matrix" in draws else centre - size // 2
        image = crop_centered(volume, start + size // 2, size)
        label = crop_centered(entry.label(), start + size // 2, size) if entry.has_label else np.zeros(size, np.uint8)
        return {"image": image, "label": label, "subject_index": np.int32(index), "centre": centre.astype(np.int32),
                "augment": packed(draws, image.shape[-1], centre - start)}

    def batch_fn(self, always_window: bool = False):
        """grain's ``batch_fn``: None (plain stacking) unless the elements go to the device, whose patches and
        windows may share a batch (:func:`cmfl_jax.data.device_inputs.stack_patches`)."""
        if not self.on_device:
            return None
        return functools.partial(stack_patches, window=self.window, always_window=always_window)


def read_ahead(batch_size: int) -> grain.ReadOptions:
    """grain's reading of the patches: ``READ_THREADS`` threads, ``READ_AHEAD_BATCHES`` batches ahead."""
    return grain.ReadOptions(num_threads=READ_THREADS,
                             prefetch_buffer_size=max(READ_THREADS, READ_AHEAD_BATCHES * batch_size))


def patch_dataset(
    entries: Sequence[CachedSubject],
    patch_size: Sequence[int],
    seed: int,
    batch_size: int = 1,
    tumour_prob: float = 1.0,
    flip: bool = False,
    num_workers: int = 0,
    shard: grain.sharding.ShardOptions | None = None,
    augment: Mapping | None = None,
) -> grain.IterDataset:
    """An endless, seeded ``IterDataset`` of batched patches (leading batch axis on every field).

    ``shard`` (e.g. ``grain.sharding.ShardByJaxProcess()``) keeps this host's elements: the patch stream is
    sliced after the random crop, so each patch is the same whichever host draws it. ``augment``:
    ``config.data.augment`` (None: no augmentation), checked here.
    """
    if not entries:
        raise CMFLError(None, "no subjects to sample patches from")
    if len(patch_size) != 3 or any(int(p) != p or p < 1 for p in patch_size):
        raise CMFLError("config.data.patch_size", f"must be 3 positive integers, got {tuple(patch_size)}")
    if batch_size < 1:
        raise CMFLError("config.train.batch_size", f"must be at least 1, got {batch_size}")
    if not 0.0 <= tumour_prob <= 1.0:
        raise CMFLError("config.data.tumour_prob", f"must lie in [0, 1], got {tumour_prob}")
    sampler = PatchSampler(patch_size, tumour_prob, flip, augment, extent=np.max([e.shape for e in entries], 0))
    source = list(enumerate(entries))
    ds = (
        grain.MapDataset.source(source)
        .seed(seed)
        .shuffle()
        .repeat()
        .random_map(sampler)
    )
    if shard is not None and shard.shard_count > 1:
        ds = ds[shard.shard_index :: shard.shard_count]
    # Batched as an IterDataset: a MapDataset of endless length cannot be batched.
    several_hosts = shard is not None and shard.shard_count > 1  # their batches must have one shape
    ds = ds.to_iter_dataset(read_ahead(batch_size)).batch(batch_size,
                                                          batch_fn=sampler.batch_fn(always_window=several_hosts))
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds
