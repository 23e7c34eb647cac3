"""Optimizers and train states, and the NaN guard every train step ends with."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from cmfl_jax.models.builder import random_params


def make_optimizer(lr: float, b1: float, b2: float, total_steps: int, decay_start: int = -1
                   ) -> optax.GradientTransformation:
    """Adam; with ``decay_start >= 0`` the rate falls linearly to 0 from that step to the last (as CycleGAN)."""
    schedule: Any = lr
    if 0 <= decay_start < total_steps:
        schedule = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, total_steps - decay_start)], [decay_start]
        )
    return optax.adam(schedule, b1=b1, b2=b2)


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of ``tree`` is finite (a scalar bool array; usable under jit)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype,
                                                                                     jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def skip_nonfinite(old_states: dict, new_states: dict, metrics: dict, grads) -> tuple[dict, dict]:
    """The NaN guard inside a train step: keep ``old_states`` (params and optimizer state) when a loss or a
    gradient is not finite, and report it as the ``skipped`` metric (1.0) and, unless ``metrics`` says otherwise
    (a float16 overflow the loss scale absorbs: :mod:`cmfl_jax.training.loss_scale`), as ``nonfinite``, the
    count towards the stop (:mod:`cmfl_jax.training.window`)."""
    finite = all_finite((metrics, grads))
    states = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_states, old_states)
    flag = 1.0 - finite.astype(jnp.float32)
    return states, {**metrics, "skipped": flag, "nonfinite": metrics.get("nonfinite", flag)}


def create_train_state(rng: jax.Array, module: nn.Module, tx: optax.GradientTransformation,
                       params: dict | None = None) -> train_state.TrainState:
    """A train state of ``module`` with ``params``, or fresh random ones (built without compiling the network)."""
    params = random_params(module, rng) if params is None else params
    return train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)
