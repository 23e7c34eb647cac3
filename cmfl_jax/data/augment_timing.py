"""Seconds per resampled patch, ``where="host"`` against ``where="device"``, for the benchmark's pipeline suite.

One 4-channel patch turned 30/30/30 deg and scaled 1.2 out of a cropped BraTS-sized volume (random values: the
cost does not depend on them). The host's whole cost is scipy's resample in the worker; the device's is split in
two: the worker cuts the fixed window (:func:`window_seconds`, the nnU-Net preset's window, in the cache's float16)
and the accelerator resamples it (:func:`device_seconds`, jitted, after a warm-up; what the device it runs on costs,
so on a CPU-only machine this is the CPU's time). ``python -m cmfl_jax.data.augment_timing`` prints all three;
the figures go to docs/timings.md.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np

from cmfl_jax.data.augment import affine_matrix, resolve_augment, turned_patch
from cmfl_jax.data.device_augment import augment_batch
from cmfl_jax.data.device_inputs import packed, window_shape
from cmfl_jax.data.pipeline import crop_centered

VOLUME = (160, 190, 150)  # a BraTS brain cropped to its bounding box
CENTRE = (80, 95, 75)
TURN = ((30, 30, 30), 1.2)


@functools.cache
def _volume(channels: int, dtype: str) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((*VOLUME, channels), np.float32).astype(dtype)


def _best(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def window(size: int) -> tuple[int, int, int]:
    """The window a ``size``^3 patch is resampled from with the nnU-Net preset (+-30 deg, scale 0.7 to 1.4)."""
    return window_shape(resolve_augment({"preset": "nnunet"}), (size,) * 3, VOLUME)


def host_seconds(size: int, channels: int = 4, repeats: int = 1) -> float:
    """``where="host"``: scipy's resample of one ``size``^3 patch (linear) and its label (nearest) in the worker."""
    image, label = _volume(channels, "float32"), _volume(1, "float32")[..., 0] > 1
    matrix = affine_matrix(*TURN)

    def run():
        turned_patch(image, CENTRE, matrix, (size,) * 3, 1)
        turned_patch(label.view(np.uint8), CENTRE, matrix, (size,) * 3, 0)

    return _best(run, repeats)


def window_seconds(size: int, channels: int = 4, repeats: int = 1) -> float:
    """``where="device"``, the worker's part: cutting the window of image (float16) and label for one patch."""
    image, label = _volume(channels, "float16"), _volume(1, "float32")[..., 0] > 1
    shape = window(size)
    return _best(lambda: (crop_centered(image, CENTRE, shape), crop_centered(label, CENTRE, shape)), repeats)


def device_seconds(size: int, channels: int = 4, repeats: int = 3) -> float:
    """``where="device"``, the accelerator's part: the jitted resample of one window already on the device (image
    linear, label nearest, float32), after a warm-up; the best of ``repeats``."""
    shape = window(size)
    batch = {"image": crop_centered(_volume(channels, "float16"), CENTRE, shape)[None].astype(np.float32),
             "label": crop_centered(_volume(1, "float32")[..., 0] > 1, CENTRE, shape)[None].view(np.uint8),
             "augment": jax.tree.map(lambda x: np.asarray(x)[None], packed({"matrix": affine_matrix(*TURN)}, channels))}
    batch = jax.device_put(batch)
    augment = jax.jit(functools.partial(augment_batch, patch=(size,) * 3, radius=0))
    jax.block_until_ready(augment(batch))  # compile
    return _best(lambda: jax.block_until_ready(augment(batch)), repeats)


def main() -> None:
    for size in (64, 128):
        print(f"{size}^3 x 4 channels, window {window(size)}: host (scipy) {host_seconds(size):.3f} s; device: "
              f"window cut {window_seconds(size):.3f} s + resample on {jax.devices()[0].platform} "
              f"{device_seconds(size):.3f} s")


if __name__ == "__main__":
    main()
