"""Intensity pre-processing: per-modality z-score over brain (non-zero) voxels (section 4.1 of the paper)."""

from __future__ import annotations

import numpy as np

from cmfl_jax.errors import CMFLError

# Bump when the maths below changes: it is part of the cache key, so caches rebuild.
PREPROCESS_VERSION = 1
NORMALIZATIONS = ("zscore_brain", "none")


def zscore_brain(volume: np.ndarray) -> np.ndarray:
    """Z-score the non-zero (brain) voxels of one modality; background stays exactly 0.

    BraTS volumes are skull-stripped, so zero marks outside-the-brain and must not enter
    the statistics (it would shift the mean towards the huge background).
    """
    volume = np.asarray(volume, dtype=np.float32)
    brain = volume != 0
    out = np.zeros_like(volume)
    values = volume[brain].astype(np.float64)
    if values.size == 0:
        return out
    std = values.std()
    out[brain] = ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def preprocess_images(images: np.ndarray, normalization: str = "zscore_brain") -> np.ndarray:
    """Apply the normalization to each modality of a ``(4, D, H, W)`` stack."""
    if normalization == "none":
        return np.asarray(images, dtype=np.float32)
    if normalization != "zscore_brain":
        raise CMFLError("config.data.normalization", f"unknown value {normalization!r}; choose one of {NORMALIZATIONS}")
    return np.stack([zscore_brain(v) for v in images])
