"""What the grain worker ships when the accelerator augments (``config.data.augment.where="device"``).

The worker draws exactly what :meth:`cmfl_jax.data.augment.Augment.draw` draws (so the stream, its resume and its
determinism are those of ``where="host"``) and hands the numbers over as small arrays of fixed shapes
(:func:`packed`): a transform not drawn gets its neutral values and its flag off. A patch without a resample is the
plain crop, as today; a patch to resample is a zero-padded window of one fixed shape (:func:`window_shape`) around
the same centre, large enough for every rotation and scale the settings allow, and no larger than the largest
volume (a window reaching out of its volume is moved inside, where the data is; ``origin`` says where the centre
is in it). So each batch has one of two shapes and the device's function compiles twice, not once per draw. For
128^3 at +-30 deg and scale 0.7 the reach alone would need 313 x 317 x 311 voxels; clipped to a cropped BraTS brain
it is about the brain's box, shipped only for the resampled fifth to third of the patches, in the cache's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import optimize

from cmfl_jax.data.augment import Augment

# The flags of ``packed(...)["on"]``, in this order.
FLAGS = ("matrix", "intensity", "gamma", "noise", "blur")


def rotations(angles_deg: np.ndarray) -> np.ndarray:
    """``affine_matrix(angles)`` (scale 1) for a stack ``(N, 3)`` of angle triples at once: ``(N, 3, 3)``."""
    a = np.deg2rad(np.asarray(angles_deg, float))
    out = np.broadcast_to(np.eye(3), (*a.shape[:-1], 3, 3)).copy()
    for axis in range(3):
        i, j = [x for x in range(3) if x != axis]
        r = np.broadcast_to(np.eye(3), out.shape).copy()
        r[..., i, i] = r[..., j, j] = np.cos(a[..., axis])
        r[..., i, j], r[..., j, i] = -np.sin(a[..., axis]), np.sin(a[..., axis])
        out = r @ out
    return out


def largest_reach(max_deg: float, half: Sequence[float]) -> np.ndarray:
    """Per axis, the largest ``sum_j |R_ij| half_j`` over rotations with each angle in +-``max_deg``: how far
    from the centre a turned box of half-sides ``half`` reaches. A grid, then a local search from its best point
    per axis; never above ``|half|`` (a turned box stays in its circumscribed sphere)."""
    half = np.asarray(half, float)
    if max_deg <= 0:
        return half.copy()
    grid = np.linspace(-max_deg, max_deg, int(min(31, 2 * math.ceil(max_deg) + 1)))
    angles = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    reach = np.abs(rotations(angles)) @ half  # (N, 3)
    out = reach.max(0)
    for i in range(3):
        def minus_reach(x, i=i):
            return -(np.abs(rotations(x[None])[0, i]) @ half)

        best = optimize.minimize(minus_reach, angles[reach[:, i].argmax()], bounds=[(-max_deg, max_deg)] * 3,
                                 method="L-BFGS-B")
        out[i] = max(out[i], -best.fun)
    return np.minimum(out, np.linalg.norm(half))


def window_reach(settings: Augment, patch_size: Sequence[int]) -> np.ndarray:
    """Per axis, how far from the patch centre a resampled patch reads (``centre + matrix @ (o - patch // 2)``,
    with the linear interpolation's next neighbour) for any angle in +-``max_rotate_deg`` and scale in
    ``scale_range``: whole voxels, one spare for rounding."""
    patch = np.array([int(p) for p in patch_size])
    angle = settings.max_rotate_deg if settings.p_rotate > 0 else 0.0
    smallest = min(1.0, settings.scale_range[0]) if settings.p_scale > 0 else 1.0
    return np.ceil(largest_reach(angle, patch // 2) / smallest + 1e-3).astype(int) + 1


def window_shape(settings: Augment, patch_size: Sequence[int], extent: Sequence[int] | None = None) -> tuple:
    """The fixed shape of the window a resampled patch is cut from: the reach either way of the centre
    (:func:`window_reach`), but no more than ``extent``, the largest volume shape, which a window clipped to
    its volume then holds whole (:func:`window_start`). Always larger than the patch: the shape tells them apart."""
    patch = np.array([int(p) for p in patch_size])
    shape = 2 * window_reach(settings, patch) + 1
    if extent is not None:
        shape = np.minimum(shape, np.asarray(extent, int))
    return tuple(int(s) for s in np.maximum(shape, patch + 1))


def window_start(centre: Sequence[int], reach: Sequence[int], shape: Sequence[int], volume: Sequence[int]):
    """Where the window of ``shape`` starts in the volume: around ``centre`` but moved inside the volume where
    it can be, so that it holds every voxel within ``reach`` of the centre that the volume has (what lies
    beyond the volume is zero, as the window's padding)."""
    centre, reach, shape = (np.asarray(x, int) for x in (centre, reach, shape))
    return np.clip(centre - reach, 0, np.maximum(np.asarray(volume[:3], int) - shape, 0))


def packed(draws: Mapping, channels: int, origin: Sequence[int] = (0, 0, 0)) -> dict[str, np.ndarray]:
    """A patch's ``Augment.draw`` result as fixed-shape arrays (neutral values where nothing was drawn);
    ``origin``: the index of the patch centre in the shipped window (unused for a plain patch)."""
    scale, shift = draws.get("intensity", (np.ones(channels), np.zeros(channels)))
    std, seed = draws.get("noise", (0.0, 0))
    return {
        "on": np.array([name in draws for name in FLAGS]),
        "matrix": np.asarray(draws.get("matrix", np.eye(3)), np.float32),
        "origin": np.asarray(origin, np.int32),
        "mirror": np.array([axis in draws.get("mirror", ()) for axis in range(3)]),
        "scale": np.asarray(scale, np.float32),
        "shift": np.asarray(shift, np.float32),
        "gamma": np.asarray(draws.get("gamma", np.ones(channels)), np.float32),
        "noise_std": np.float32(std),
        "noise_key": np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32),  # the 64-bit seed as a threefry key
        "sigma": np.asarray(draws.get("blur", np.zeros(channels)), np.float32),
    }


def _stack(items: list):
    if isinstance(items[0], dict):
        return {k: _stack([x[k] for x in items]) for k in items[0]}
    return np.stack(items)


def stack_patches(elements: Sequence[dict], window: Sequence[int], always_window: bool = False) -> dict:
    """A batch of ``where="device"`` elements: stacked as they are when their shapes agree, else (or always,
    with ``always_window``: hosts that must agree on the shape) each plain patch zero-padded into a window's
    corner, where the device cuts it back out exactly (no resample drawn)."""
    if always_window or len({e["image"].shape for e in elements}) > 1:
        elements = [_in_window(e, tuple(window)) for e in elements]
    return _stack(list(elements))


def _in_window(element: dict, window: tuple) -> dict:
    image, label = element["image"], element["label"]
    if image.shape[:3] == window:
        return element
    big_image = np.zeros((*window, *image.shape[3:]), image.dtype)
    big_label = np.zeros(window, label.dtype)
    where = tuple(slice(0, p) for p in image.shape[:3])
    big_image[where], big_label[where] = image, label
    return {**element, "image": big_image, "label": big_label}
