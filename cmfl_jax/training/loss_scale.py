"""Dynamic loss scaling for float16 (``config.model.dtype="float16"``: GPUs without bfloat16, such as the T4).

float16 keeps ~5 significant bits less range than float32: small gradients flush to zero. The loss is multiplied
by a scale before the backward pass and the gradients divided by it after (Flax's
:class:`~flax.training.dynamic_scale.DynamicScale`); the scale halves after a step whose gradients overflow (that
update is skipped) and doubles after ``growth_interval`` finite steps in a row. Each ``value_and_grad`` of a step
has its own scale: CMFF one (``seg``), CMFT two (``generators``, ``discriminators``). They are the checkpoint
item ``loss_scale`` of the train states, so a resumed run goes on with the scale it stopped at. float32 and
bfloat16 (float32's range) use no scale and have no such item.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax.training.dynamic_scale import DynamicScale

from cmfl_jax.training.state import all_finite

ITEM = "loss_scale"


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether this config's steps scale their losses: ``model.dtype == "float16"``."""
    return config.model.dtype == "float16"


def create(config: ml_collections.ConfigDict, names: tuple[str, ...]) -> dict:
    """``{ITEM: {name: DynamicScale}}`` for a float16 config (one scale per name), else ``{}``: merged into the
    train states, so the scales are saved and restored with them."""
    if not enabled(config):
        return {}
    s = config.train.loss_scale
    return {ITEM: {name: DynamicScale(growth_interval=int(s.growth_interval), minimum_scale=float(s.minimum),
                                      fin_steps=jnp.zeros((), jnp.int32), scale=jnp.asarray(s.initial, jnp.float32))
                   for name in names}}


def value_and_grad(fun: Callable, params, scale: DynamicScale | None) -> tuple:
    """``((loss, aux), grads, new_scale, headroom)`` of ``fun(params) -> (loss, aux)``; with a ``scale`` the
    gradients come from the scaled loss, unscaled. ``headroom``: the gradients are finite or the scale can still
    fall, i.e. a non-finite gradient is an overflow the scale handles, not a failure the NaN guard must count."""
    if scale is None:
        out, grads = jax.value_and_grad(fun, has_aux=True)(params)
        return out, grads, None, jnp.asarray(False)
    new_scale, finite, out, grads = scale.value_and_grad(fun, has_aux=True)(params)
    return out, grads, new_scale, finite | (scale.scale > scale.minimum_scale)


def guard_metrics(metrics: dict, grads, headroom: jax.Array, scales: dict[str, DynamicScale]) -> dict:
    """``metrics`` with ``nonfinite``: what the NaN guard counts towards its stop, a non-finite loss, or a
    non-finite gradient the loss scale cannot absorb; and each scale (``<name>_loss_scale``) to log."""
    counted = ~all_finite(metrics) | (~all_finite(grads) & ~headroom)
    scale_metrics = {f"{name}_loss_scale": s.scale for name, s in scales.items()}
    return {**metrics, **scale_metrics, "nonfinite": counted.astype(jnp.float32)}
