"""Augmentation on the accelerator (``config.data.augment.where="device"``): the transforms of
:mod:`cmfl_jax.data.augment` as one jitted function of the batch the grain worker shipped.

Why this split: scipy's resample of a 128^3 patch keeps a CPU worker busy for about a second, which a GPU step
would wait for. The worker still draws every number (the same draws as ``where="host"``, from grain's per-element
``rng``: the stream, its resume and its determinism do not change) and cuts the plain patch, or a fixed window
for a resample (:mod:`cmfl_jax.data.device_inputs`); this module applies the draws in the host's order: resample
(``jax.scipy.ndimage.map_coordinates``, linear for the image, nearest for the label), intensity scale and shift,
gamma, noise, blur, mirroring. Every transform is a ``lax.cond`` on its flag, so one not drawn costs nothing;
the elements of a batch go one by one (``lax.map``) on each device's share (``shard_map``). The batch has one of
two shapes (patch or window), so the function compiles twice; the train steps are untouched.

Against the host's version on the same draws: the resample's coordinates are float32 here, float64 in scipy, so
a linear value differs by the coordinate's rounding (~1e-5 voxel) times the neighbours' difference, and a nearest
label voxel can differ where its sampling point is within that rounding of a half-voxel tie; intensity, gamma
and blur (scipy's kernel, ``truncate=4``, ``mode="reflect"``) agree to float32 rounding; the noise is
``jax.random.normal`` from the drawn seed, not numpy's: the same distribution, other values.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.scipy.ndimage import map_coordinates
from jax.sharding import PartitionSpec as P

from cmfl_jax.data.augment import Augment, resolve_augment
from cmfl_jax.data.device_inputs import FLAGS
from cmfl_jax.sharding import DATA_AXIS

MATRIX, INTENSITY, GAMMA, NOISE, BLUR = (FLAGS.index(k) for k in ("matrix", "intensity", "gamma", "noise", "blur"))


def coordinates(matrix: jax.Array, origin: jax.Array, patch: Sequence[int]) -> list[jax.Array]:
    """Where each patch voxel ``o`` reads the window: ``origin + matrix @ (o - patch // 2)`` (float32)."""
    offsets = jnp.meshgrid(*[jnp.arange(p, dtype=jnp.float32) - p // 2 for p in patch], indexing="ij")
    origin = origin.astype(jnp.float32)
    return [origin[i] + sum(matrix[i, j] * offsets[j] for j in range(3)) for i in range(3)]


def resample(image: jax.Array, label: jax.Array | None, matrix: jax.Array, origin: jax.Array,
             patch: Sequence[int]):
    """The ``patch`` turned by ``matrix`` around the window's element ``origin`` (the patch centre): image
    linear, label nearest; zero beyond the window."""
    where = coordinates(matrix, origin, patch)
    turn = jax.vmap(lambda channel: map_coordinates(channel, where, order=1, mode="constant"), -1, -1)
    return turn(image), None if label is None else map_coordinates(label, where, order=0, mode="constant")


def corner(image: jax.Array, label: jax.Array | None, patch: Sequence[int]):
    """The ``patch`` in the corner of a window, where a batch of patches and windows padded it in."""
    where = tuple(slice(0, p) for p in patch)
    return image[where], None if label is None else label[where]


def intensity(image: jax.Array, brain: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """Per channel ``image * scale + shift`` on the brain (``(D, H, W)`` bool), the background kept."""
    return jnp.where(brain[..., None], image * scale + shift, image)


def gamma(image: jax.Array, brain: jax.Array, power: jax.Array) -> jax.Array:
    """Per channel, the brain's values rescaled to [0, 1] (its min and max), raised to ``power``, mapped back."""
    inside = brain[..., None]
    lo = jnp.min(jnp.where(inside, image, jnp.inf), axis=(0, 1, 2))
    span = jnp.max(jnp.where(inside, image, -jnp.inf), axis=(0, 1, 2)) - lo + jnp.float32(1e-7)
    return jnp.where(inside, ((image - lo) / span) ** power * span + lo, image)


def noise(image: jax.Array, std: jax.Array, key_data: jax.Array) -> jax.Array:
    """``image`` plus Gaussian noise of ``std``, from the threefry key whose two words are the drawn seed."""
    key = jax.random.wrap_key_data(key_data, impl="threefry2x32")
    return image + jax.random.normal(key, image.shape, jnp.float32) * std


def gaussian_kernels(sigma: jax.Array, radius: int) -> jax.Array:
    """``(C, 2 * radius + 1)``: scipy's ``gaussian_filter`` kernel per channel (``truncate=4``: taps beyond
    ``int(4 * sigma + 0.5)`` are 0, so one static ``radius``, the largest sigma's, serves every sigma)."""
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    reach = jnp.floor(4.0 * sigma + 0.5)[:, None]
    weights = jnp.exp(-0.5 / jnp.maximum(sigma[:, None] ** 2, 1e-30) * taps**2)
    weights = jnp.where(jnp.abs(taps) <= reach, weights, 0.0)
    return weights / weights.sum(1, keepdims=True)


def blur(image: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Per channel a Gaussian blur of ``sigma`` voxels, axis by axis, scipy's ``mode="reflect"`` boundary."""
    kernels = gaussian_kernels(sigma, radius)
    for axis in range(3):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(image, pad, mode="symmetric")  # scipy's "reflect": d c b a | a b c d | d c b a
        n = image.shape[axis]
        image = sum(kernels[:, t] * lax.slice_in_dim(padded, t, t + n, axis=axis) for t in range(2 * radius + 1))
    return image


def mirror(image: jax.Array, label: jax.Array | None, axes: jax.Array):
    """Image and label flipped along each spatial axis whose flag in ``axes`` (3 bools) is set."""
    for axis in range(3):
        image, label = lax.cond(axes[axis], lambda x, a=axis: jax.tree.map(lambda v: jnp.flip(v, a), x),
                                lambda x: x, (image, label))
    return image, label


def augment_one(image: jax.Array, label: jax.Array | None, draws: Mapping[str, jax.Array], *,
                patch: Sequence[int], radius: int):
    """One element: ``image`` ``(S, S, S, C)`` (the patch, or a window when ``S`` is not the patch), ``label``
    ``(S, S, S)`` or None, ``draws`` as :func:`cmfl_jax.data.device_inputs.packed` ships them."""
    on, patch = draws["on"], tuple(patch)
    image = image.astype(jnp.float32)
    if image.shape[:3] != patch:  # a window: turned if drawn, else the padded-in patch
        image, label = lax.cond(on[MATRIX], lambda i, lb: resample(i, lb, draws["matrix"], draws["origin"], patch),
                                lambda i, lb: corner(i, lb, patch), image, label)
    brain = jnp.any(image != 0, axis=-1)  # before intensity and gamma, as the host's
    image = lax.cond(on[INTENSITY], lambda x: intensity(x, brain, draws["scale"], draws["shift"]), lambda x: x, image)
    image = lax.cond(on[GAMMA], lambda x: gamma(x, brain, draws["gamma"]), lambda x: x, image)
    image = lax.cond(on[NOISE], lambda x: noise(x, draws["noise_std"], draws["noise_key"]), lambda x: x, image)
    if radius > 0:
        image = lax.cond(on[BLUR], lambda x: blur(x, draws["sigma"], radius), lambda x: x, image)
    return mirror(image, label, draws["mirror"])


def augment_batch(batch: Mapping, *, patch: Sequence[int], radius: int) -> dict:
    """A batch from the pipeline (``image``, maybe ``label``, ``augment``) -> the same keys but ``augment``, the
    patches augmented, the image float32."""
    def one(x):
        return augment_one(x["image"], x.get("label"), x["augment"], patch=patch, radius=radius)

    image, label = lax.map(one, {k: batch[k] for k in ("image", "label", "augment") if k in batch})
    out = {k: v for k, v in batch.items() if k != "augment"}
    out["image"] = image
    if label is not None:
        out["label"] = label
    return out


class DeviceAugment:
    """The loop's augmentation of a batch on the device: ``augment(batch, mesh)``, jitted once per mesh (and per
    input shape), each device augmenting its share of the batch."""

    def __init__(self, settings: Augment, patch_size: Sequence[int]):
        self.patch = tuple(int(p) for p in patch_size)
        self.radius = int(4.0 * settings.blur_sigma[1] + 0.5) if settings.p_blur > 0 else 0  # scipy's, largest sigma
        self._jitted: dict = {}

    def __call__(self, batch: Mapping, mesh: jax.sharding.Mesh) -> dict:
        if mesh not in self._jitted:
            body = functools.partial(augment_batch, patch=self.patch, radius=self.radius)
            split = P(DATA_AXIS)
            self._jitted[mesh] = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(split,), out_specs=split))
        return self._jitted[mesh](dict(batch))


def device_augmentation(config: ml_collections.ConfigDict) -> DeviceAugment | None:
    """The augmentation a phase's loop runs on the device: None unless ``config.data.augment`` is on and
    ``where="device"``."""
    settings = resolve_augment(config.data.augment, config.data.flip)
    if not settings.on or settings.where != "device":
        return None
    return DeviceAugment(settings, config.data.patch_size)
