"""Params without compiling anything.

``jax.jit(module.init)`` compiles the whole network (seconds, even for a tiny CMFFNet on a CPU) and
even drawing the leaves with ``jax.random`` compiles a threefry kernel per shape, although a conv's
params do not depend on the input at all. Here the tree comes from
``jax.eval_shape`` (tracing only) and every leaf is drawn with NumPy, seeded by the JAX key, from the
initializer the modules declare: ``kernel`` lecun-normal (Conv3D, UpConv3D, Dense: a normal truncated
at 2 sigma, rescaled to variance 1/fan_in, as flax's), ``bias`` zeros, ``scale`` ones (InstanceNorm).
Same tree, shapes, dtypes and distribution as ``module.init``; not the same numbers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Standard deviation of a standard normal truncated to [-2, 2] (flax's variance_scaling constant).
_TRUNCATED_STD = 0.87962566103423978


def _lecun_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    fan_in = int(np.prod(shape[:-1]))
    z = rng.standard_normal(shape)
    outside = np.abs(z) > 2.0
    while outside.any():  # rejection: redraw until every value lies within 2 sigma
        z[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(z) > 2.0
    return z * (np.sqrt(1.0 / fan_in) / _TRUNCATED_STD)


_INITIALIZERS = {
    "kernel": _lecun_normal,
    "bias": lambda rng, shape: np.zeros(shape),
    "scale": lambda rng, shape: np.ones(shape),
}


def init_params(module: nn.Module, rng: jax.Array, *inputs: Any) -> dict:
    """``module.init(rng, *inputs)["params"]`` in distribution, for the cost of a trace (inputs may be abstract)."""
    shapes = jax.eval_shape(module.init, rng, *inputs)["params"]
    flat = traverse_util.flatten_dict(shapes)
    unknown = sorted("/".join(p) for p in flat if p[-1] not in _INITIALIZERS)
    if unknown:
        raise ValueError(f"init_params does not know how to initialise {unknown[0]}; use module.init")
    seed = np.asarray(jax.random.key_data(rng), np.uint32).ravel().tolist()
    draw = np.random.default_rng(seed)
    out = {p: jnp.asarray(_INITIALIZERS[p[-1]](draw, s.shape), s.dtype) for p, s in flat.items()}
    return traverse_util.unflatten_dict(out)
