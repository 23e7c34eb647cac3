"""Full-volume prediction by sliding windows, shared by CMFF validation, prediction and evaluation.

A volume is covered by windows of the training patch size with a given overlap; each window's
class probabilities are weighted by a Gaussian importance map (the window's centre counts more
than its border, where the network saw less context) and the weighted sum is normalised by the
sum of the weights. Windows go to the network in batches of a fixed size (the last batch is
zero-padded), so the network compiles once per window shape. Volumes smaller than the window are
zero-padded (zero is background after z-scoring) and cropped back.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np

from cmfl_jax.data.pairs import split_pairs
from cmfl_jax.errors import CMFLError

Predict = Callable[[np.ndarray], np.ndarray]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """First voxel of each window along one axis: evenly spread, first at 0, last flush with the end."""
    if size <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    n = math.ceil((size - window) / step) + 1
    return [round(i * (size - window) / (n - 1)) for i in range(n)]


def gaussian_importance(window: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """``window``-shaped weights, a Gaussian with sigma = ``sigma_scale`` * window per axis, max 1 (as nnU-Net)."""
    axes = []
    for w in window:
        x = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
        axes.append(np.exp(-0.5 * (x / (sigma_scale * w)) ** 2))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(g / g.max(), 1e-4).astype(np.float32)


FLIPS = tuple(axes for r in range(4) for axes in itertools.combinations((1, 2, 3), r))  # the 8 flips of D, H, W


def mirrored(predict: Predict) -> Predict:
    """Test-time mirroring: the mean over all 8 flips of the three spatial axes, each flipped back.

    One flip at a time, each through ``predict`` (the one compiled plain function), summed on the host: the
    device holds one window batch at a time, so the peak memory is the plain prediction's (holding the 8 flips
    in one compiled call took 7.3 GB against 2.2 GB at 128³, see docs/performance.md).
    """

    def predict_mirrored(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        total = None
        for axes in FLIPS:
            y = np.asarray(predict(np.ascontiguousarray(np.flip(x, axes)) if axes else x), np.float32)
            y = np.flip(y, axes) if axes else y
            total = y.copy() if total is None else total + y
        return total / np.float32(len(FLIPS))

    return predict_mirrored


def choose_window(setting: str, trained: Sequence[int], shape: Sequence[int], multiple: int) -> tuple[int, ...]:
    """The window of ``config.window``: "" the training patch ``trained``; "whole" the volume ``shape`` in one
    window, each edge rounded up to a multiple of ``multiple`` (the U-Net's 2^depth); "D,H,W" those edges.

    The network is fully convolutional: fewer, larger windows do less redundant work, but its instance norms then
    see other statistics than in training, so the quality must be measured (docs/performance.md)."""
    if not setting:
        return tuple(int(w) for w in trained)
    if setting == "whole":
        return tuple(-(-int(s) // multiple) * multiple for s in shape)
    try:
        window = tuple(int(w) for w in setting.split(","))
    except ValueError:
        window = ()
    if len(window) != 3 or min(window) < 1 or any(w % multiple for w in window):
        raise CMFLError("config.window", f"must be '', 'whole' or 3 comma-separated edges that are multiples of "
                                         f"{multiple}, got {setting!r}")
    return window


def sliding_window(predict: Predict, image: np.ndarray, window: Sequence[int], overlap: float = 0.5,
                   batch_size: int = 1, importance: str = "gaussian") -> np.ndarray:
    """Class probabilities ``(D, H, W, K)`` of a whole ``(D, H, W, C)`` volume.

    Args:
      predict: ``(B, *window, C) -> (B, *window, K)`` probabilities (jitted; called with a fixed B).
      image: the volume, channels last.
      window: window edge per axis.
      overlap: fraction of a window shared with its neighbour (0 <= overlap < 1).
      batch_size: windows per call of ``predict``.
      importance: "gaussian" or "constant" weighting of each window's voxels.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    window = tuple(int(w) for w in window)
    shape = image.shape[:3]
    padded = tuple(max(s, w) for s, w in zip(shape, window, strict=True))
    before = [(p - s) // 2 for p, s in zip(padded, shape, strict=True)]
    pad = [(b, p - s - b) for b, p, s in zip(before, padded, shape, strict=True)] + [(0, 0)]
    volume = np.pad(np.asarray(image, np.float32), pad) if any(map(any, pad)) else np.asarray(image, np.float32)
    weight = gaussian_importance(window) if importance == "gaussian" else np.ones(window, np.float32)
    corners = list(itertools.product(*(window_starts(p, w, overlap) for p, w in zip(padded, window, strict=True))))
    acc, norm = None, np.zeros(padded, np.float32)
    for i in range(0, len(corners), batch_size):
        chunk = corners[i : i + batch_size]
        x = np.zeros((batch_size, *window, volume.shape[-1]), np.float32)
        for j, (d, h, w) in enumerate(chunk):
            x[j] = volume[d : d + window[0], h : h + window[1], w : w + window[2]]
        probs = np.asarray(predict(x), np.float32)
        if acc is None:
            acc = np.zeros((*padded, probs.shape[-1]), np.float32)
        for j, (d, h, w) in enumerate(chunk):
            region = (slice(d, d + window[0]), slice(h, h + window[1]), slice(w, w + window[2]))
            acc[region] += probs[j] * weight[..., None]
            norm[region] += weight
    out = acc / norm[..., None]
    return out[before[0] : before[0] + shape[0], before[1] : before[1] + shape[1], before[2] : before[2] + shape[2]]


def restrict_to_brain(pred: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Set the prediction to background outside the brain (voxels where every modality is 0), as nnU-Net does."""
    return np.where(np.any(image != 0, axis=-1), pred, 0).astype(pred.dtype)


def cmff_predict_fn(model, pairing: str, mirror: bool = False) -> Callable[[dict, jax.Array], jax.Array]:
    """A ``(params, (B, *window, 4)) -> (B, *window, K)`` probability function of a CMFFNet (K = 4 classes or 3
    regions): jitted, or with ``mirror`` the mean over the 8 flips of that one jitted function (:func:`mirrored`).

    Params are an argument, not a constant, so one compilation serves every validation of a run:
    bind them with ``functools.partial(fn, params)`` to get a :data:`Predict`.
    """

    def probs(params, x):
        a, b = split_pairs(x, pairing)
        return model.apply({"params": params}, a, b)["probs"]

    plain = jax.jit(probs)
    if mirror:
        return lambda params, x: mirrored(lambda y: plain(params, y))(x)
    return plain
