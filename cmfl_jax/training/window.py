"""The metrics of the steps between two logs, kept on the device, so the loop never waits for a step to log it.

After each step one small jitted function adds the step's metrics into a window: sums over the steps the NaN
guard kept, the number of kept and skipped steps, and the guard's count of non-finite steps in a row. The loop
reads the window (one device-to-host transfer of a few scalars) every ``log_every`` steps, before a save and
before a hook that needs the states; that is also where it learns that the guard asked for a stop.

Once the count in a row reaches the limit the window freezes: it remembers that step (``stop_step``), and the
steps the device runs before the loop reads it change nothing in it. The loop then raises without saving, so
the stop is the one an eager check would make, found up to ``log_every`` steps later.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Metrics of a step that drive the guard rather than being averaged (see cmfl_jax.training.state.skip_nonfinite).
GUARD_KEYS = ("skipped", "nonfinite")


def empty(metrics: Mapping[str, jax.Array], in_a_row: jax.Array | int = 0) -> dict:
    """A window with no step in it for a step's ``metrics`` (arrays or shapes); ``in_a_row`` carries over."""
    names = [k for k in metrics if k not in GUARD_KEYS]
    return {
        "sums": {k: jnp.zeros((), jnp.float32) for k in names},
        "bad": {k: jnp.zeros((), jnp.bool_) for k in names},  # a skipped step's value was not finite
        "kept": jnp.zeros((), jnp.int32),
        "skipped": jnp.zeros((), jnp.int32),
        "in_a_row": jnp.asarray(in_a_row, jnp.int32),
        "stop_step": jnp.zeros((), jnp.int32),  # 0: no stop; else the step the count in a row reached the limit
        "last": jnp.zeros((), jnp.int32),  # the last step added
    }


@functools.partial(jax.jit, static_argnames="limit", donate_argnums=0)
def add(window: dict, metrics: Mapping[str, jax.Array], step: jax.Array, *, limit: int) -> dict:
    """``window`` with one more step: its metrics summed if the guard kept the update, counted if it did not."""
    skipped = jnp.asarray(metrics.get("skipped", 0.0)) > 0  # a step without the guard: never skipped
    counted = jnp.asarray(metrics.get("nonfinite", metrics.get("skipped", 0.0))) > 0  # counts towards the stop
    in_a_row = jnp.where(counted, window["in_a_row"] + 1, 0)
    new = {
        "sums": {k: s + jnp.where(skipped, 0.0, metrics[k].astype(jnp.float32)) for k, s in window["sums"].items()},
        "bad": {k: b | (skipped & ~jnp.isfinite(metrics[k])) for k, b in window["bad"].items()},
        "kept": window["kept"] + (~skipped).astype(jnp.int32),
        "skipped": window["skipped"] + skipped.astype(jnp.int32),
        "in_a_row": in_a_row,
        "stop_step": jnp.where(in_a_row >= limit, step, 0).astype(jnp.int32),
        "last": jnp.asarray(step, jnp.int32),
    }
    frozen = window["stop_step"] > 0
    return jax.tree.map(lambda old, n: jnp.where(frozen, old, n), window, new)


def restart(window: dict) -> dict:
    """An empty window after a log: the sums start again, the count in a row does not."""
    return empty(window["sums"], window["in_a_row"])


def summary(host: Mapping) -> dict[str, float]:
    """The means of a window read to the host (``jax.device_get``): NaN for a window of skipped steps only,
    and ``skipped``, the number of updates the guard skipped in it."""
    kept = int(host["kept"])
    means = {k: float(s) / kept if kept else float("nan") for k, s in host["sums"].items()}
    return {**means, "skipped": float(host["skipped"])}


def read(window: dict) -> dict:
    """The window on the host (the loop's one synchronisation with the device between logs)."""
    return jax.tree.map(np.asarray, jax.device_get(window))
