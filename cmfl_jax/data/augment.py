"""Data augmentation of the training patches (``config.data.augment``), off in the paper's recipe.

Transforms, each applied to a patch with its own probability ``p_*`` (nnU-Net's set): mirroring (each axis
with ``p_mirror``), rotation (three angles in +-``max_rotate_deg``) and scaling (``scale_range``; > 1 enlarges
the anatomy) in one affine resample around the patch centre, intensity scale and shift per channel, gamma per
channel (nnU-Net's way: the brain's values rescaled to [0, 1], raised to gamma, mapped back), Gaussian noise
and Gaussian blur. Scale/shift and gamma act on the brain (voxels non-zero in any channel), so the background
stays 0 as z-scoring left it; noise and blur act on the whole patch, as in nnU-Net.

The numbers come only from the ``rng`` grain's ``RandomMap`` passes (seed and element index), drawn after the
patch centre and only for the transforms whose probability is not 0: augmented patches are a function of the
seed and the step, a resumed iterator continues them, and with every probability 0 nothing extra is drawn, so
the stream is the un-augmented one bit for bit. The mirror draws come first, exactly as ``config.data.flip``
drew them, so ``flip=True`` is ``p_mirror=0.5``.

Rotation and scaling resample a window just large enough for the turned patch (scipy.ndimage, on the CPU
worker), the image with ``image_order`` 1 (linear: a quarter of cubic's time, and no overshoot at the
brain's edge), the label with order 0 (nearest: its values stay 0/1/2/4). A resampled patch costs far more
than a plain crop (its measured cost: docs/timings.md; ``python -m cmfl_jax.data.augment`` measures it). With
the nnU-Net preset a fifth to a third of the patches are resampled. ``where="device"`` draws the same numbers here
and leaves the transforms to the accelerator (:mod:`cmfl_jax.data.device_augment`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from cmfl_jax.errors import CMFLError

KEY = "config.data.augment"
WHERE = ("host", "device")  # where the transforms run (the draws are always the host worker's)
PROBABILITIES = ("p_mirror", "p_rotate", "p_scale", "p_intensity", "p_gamma", "p_noise", "p_blur")
LOWEST = {"noise_std": 0.0, "blur_sigma": 0.0, "intensity_shift": -math.inf}  # ranges that may reach 0 or below
# A preset gives the probabilities left unset (None) in the config; the ranges are the config's.
PRESETS = {
    "none": {},
    "nnunet": {"p_mirror": 0.5, "p_rotate": 0.2, "p_scale": 0.2, "p_intensity": 0.15, "p_gamma": 0.3,
               "p_noise": 0.1, "p_blur": 0.2},
}


@dataclasses.dataclass(frozen=True)
class Augment:
    """The resolved settings (all probabilities set); the defaults are those of ``config_defaults``."""

    p_mirror: float = 0.0
    p_rotate: float = 0.0
    p_scale: float = 0.0
    p_intensity: float = 0.0
    p_gamma: float = 0.0
    p_noise: float = 0.0
    p_blur: float = 0.0
    max_rotate_deg: float = 30.0
    scale_range: tuple[float, float] = (0.7, 1.4)
    image_order: int = 1
    intensity_scale: tuple[float, float] = (0.75, 1.25)
    intensity_shift: tuple[float, float] = (-0.1, 0.1)
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_std: tuple[float, float] = (0.0, 0.3)
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    where: str = "host"

    @property
    def on(self) -> bool:
        return any(getattr(self, p) > 0 for p in PROBABILITIES)

    def draw(self, rng: np.random.Generator, channels: int) -> dict:
        """This patch's transforms and their numbers; only the probabilities above 0 draw from ``rng``."""

        def drawn(p: float) -> bool:
            return p > 0 and rng.random() < p

        out: dict = {}
        if self.p_mirror > 0:
            out["mirror"] = tuple(a for a in range(3) if rng.random() < self.p_mirror)
        angles = rng.uniform(-1, 1, 3) * self.max_rotate_deg if drawn(self.p_rotate) else np.zeros(3)
        scale = rng.uniform(*self.scale_range) if drawn(self.p_scale) else 1.0
        if angles.any() or scale != 1.0:
            out["matrix"] = affine_matrix(angles, scale)
        if drawn(self.p_intensity):
            scale_c = rng.uniform(*self.intensity_scale, channels)
            out["intensity"] = (scale_c, rng.uniform(*self.intensity_shift, channels))
        if drawn(self.p_gamma):  # nnU-Net: when the range spans 1, half the time below 1, else above
            lo, hi = self.gamma_range
            if lo < 1 < hi:
                below = rng.random(channels) < 0.5
                out["gamma"] = np.where(below, rng.uniform(lo, 1, channels), rng.uniform(1, hi, channels))
            else:
                out["gamma"] = rng.uniform(lo, hi, channels)
        if drawn(self.p_noise):
            out["noise"] = (rng.uniform(*self.noise_std), int(rng.integers(2**63)))
        if drawn(self.p_blur):
            out["blur"] = rng.uniform(*self.blur_sigma, channels)
        return out


def resolve_augment(config: Mapping | None, flip: bool = False) -> Augment:
    """The settings of ``config.data.augment`` (a preset, then the keys set), checked; ``flip`` (``config.data.flip``)
    is ``p_mirror=0.5`` unless ``p_mirror`` is set. Missing keys take the defaults; ``None`` is all off."""
    values = dict(config or {})
    preset = values.pop("preset", "none")
    if preset not in PRESETS:
        raise CMFLError(f"{KEY}.preset", f"unknown preset {preset!r}; one of {sorted(PRESETS)}")
    fields = {f.name: f for f in dataclasses.fields(Augment)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CMFLError(f"{KEY}.{unknown[0]}", f"unknown augmentation key; known: {sorted(fields)}")
    base = {**PRESETS[preset], **({"p_mirror": 0.5} if flip else {})}
    settled = {}
    for name, value in values.items():
        value = base.get(name, fields[name].default) if value is None else value
        settled[name] = _check(name, value, fields[name].default)
    out = Augment(**{**base, **settled})
    if out.where == "device" and out.image_order != 1:
        raise CMFLError(f"{KEY}.image_order", "must be 1 with where='device' (jax's map_coordinates is linear at most)")
    return out


def _check(name: str, value: object, default: object) -> object:
    """``value`` of key ``name`` as the type of its default, or a CMFLError naming the key."""
    where = f"{KEY}.{name}"
    if name == "where":
        if value not in WHERE:
            raise CMFLError(where, f"must be one of {WHERE}, got {value!r}")
        return value
    if isinstance(default, tuple):
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise CMFLError(where, f"must be two numbers (low, high), got {value!r}") from None
        floor = LOWEST.get(name, 0.0)  # strictly above 0 for the scales and gamma
        if not (math.isfinite(lo) and math.isfinite(hi) and floor <= lo <= hi and (name in LOWEST or lo > 0)):
            kind = "finite" if floor == -math.inf else "non-negative" if name in LOWEST else "positive"
            raise CMFLError(where, f"must be {kind} numbers with low <= high, got {tuple(value)!r}")
        return lo, hi
    if name == "image_order":
        if value not in (1, 3):
            raise CMFLError(where, f"must be 1 (linear) or 3 (cubic), got {value!r}")
        return int(value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CMFLError(where, f"must be a number, got {value!r}") from None
    if name in PROBABILITIES and not 0.0 <= value <= 1.0:
        raise CMFLError(where, f"must lie in [0, 1], got {value}")
    if name == "max_rotate_deg" and not 0.0 <= value <= 180.0:
        raise CMFLError(where, f"must lie in [0, 180], got {value}")
    return value


def affine_matrix(angles_deg: Sequence[float], scale: float = 1.0) -> np.ndarray:
    """Output offset -> input offset: rotations about axes 0, 1, 2 by ``angles_deg``, content enlarged
    ``scale``-fold."""
    rotation = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(np.asarray(angles_deg, float))):
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(angle)
        r[i, j], r[j, i] = -math.sin(angle), math.sin(angle)
        rotation = r @ rotation
    return rotation / scale


def turned_patch(volume, centre: Sequence[int], matrix: np.ndarray, size: Sequence[int], order: int) -> np.ndarray:
    """The ``size`` patch of ``volume`` (``(D, H, W, ...)``, e.g. a lazy cached one) around ``centre``, turned by
    ``matrix``: output voxel ``o`` reads ``centre + matrix @ (o - size // 2)``, zero outside the volume.

    Reads only the part of the volume the turned patch touches (with cubic interpolation's neighbours), so a
    shrinking scale or a large angle does not allocate a window larger than the volume; ``grid-constant``
    interpolates towards the zeros beyond the volume's edge as a zero-padded window would.
    """
    size_ = np.array([int(s) for s in size])
    half = np.ceil(np.abs(matrix) @ (size_ / 2) - 1e-9).astype(int) + 2
    lo = np.maximum(np.asarray(centre) - half, 0)
    hi = np.minimum(np.asarray(centre) + half + 1, volume.shape[:3])
    window = np.asarray(volume[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))])
    offset = (np.asarray(centre) - lo) - matrix @ (size_ // 2)

    def one(array: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(array, matrix, offset, tuple(size_), window.dtype, order=order,
                                        mode="grid-constant")

    if window.ndim == 3:
        return one(window)
    out = np.empty((*size_, *window.shape[3:]), window.dtype)
    for c in range(window.shape[-1]):  # the channels one by one
        out[..., c] = one(window[..., c])
    return out


def apply_voxelwise(draws: Mapping, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intensity scale/shift and gamma on the brain, noise, blur, then mirroring (new arrays; dtypes kept)."""
    image = np.array(image, np.float32)
    brain = np.any(image != 0, axis=-1) if "intensity" in draws or "gamma" in draws else None
    if "intensity" in draws:
        scale, shift = draws["intensity"]
        image[brain] = image[brain] * scale.astype(np.float32) + shift.astype(np.float32)
    if "gamma" in draws and brain.any():
        values = image[brain]
        lo, span = values.min(0), values.max(0) - values.min(0) + np.float32(1e-7)
        image[brain] = ((values - lo) / span) ** draws["gamma"].astype(np.float32) * span + lo
    if "noise" in draws:
        std, seed = draws["noise"]
        image += np.random.default_rng(seed).standard_normal(image.shape, np.float32) * np.float32(std)
    for c, sigma in enumerate(draws.get("blur", ())):
        image[..., c] = ndimage.gaussian_filter(image[..., c], sigma)
    axes = draws.get("mirror", ())
    if axes:
        image, label = np.flip(image, axes), np.flip(label, axes)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def _time_one_patch() -> None:
    """Seconds to resample one 4-channel patch of 64^3 and of 128^3 (``python -m cmfl_jax.data.augment``)."""
    import time

    matrix = affine_matrix((30, 30, 30), 1.2)
    volume = np.random.default_rng(0).standard_normal((160, 190, 150, 4), np.float32)  # a cropped BraTS brain
    for size in (64, 128):
        for order in (1, 3):
            start = time.perf_counter()
            turned_patch(volume, (80, 95, 75), matrix, (size,) * 3, order)
            print(f"{size}^3, order {order}: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    _time_one_patch()
