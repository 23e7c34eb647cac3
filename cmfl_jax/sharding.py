"""Data parallelism with JAX's own SPMD: one mesh axis ``data``, the batch split over it, the states replicated.

Both phases jit their one train step with these shardings (:func:`jit_train_step`); XLA inserts the
gradient all-reduce, so a step on N devices computes what one device computes on the same global batch.
``config.train.batch_size`` is the batch per device: the global batch is that times ``jax.device_count()``,
and each host's data pipeline yields its ``batch_size * jax.local_device_count()`` share
(:func:`host_batch_size`, :func:`data_shard`). With ``config.distributed`` several hosts join through
:func:`initialize_distributed` before JAX touches a device. One device is the degenerate mesh: the same
step, the same numbers as without a mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Join the other hosts (``jax.distributed.initialize``, cluster from the environment) if ``config.distributed``.

    Must run before anything asks JAX for its devices; a second call is a no-op.
    """
    if config.get("distributed", False) and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every host) with the axis ``data``.

    ``Auto`` axis type: the shardings of the inputs and outputs are given, XLA propagates the rest.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over ``data``; every other axis whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of ``tree`` (train states: params, optimizer state, step) on every device of ``mesh``.

    With several hosts the value must be the same on each (the same seed gives the same init).
    """
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """A global array per leaf from this host's part of the batch, split over ``data`` along axis 0.

    On one host the part is the whole batch; its leading axis must divide by the number of devices.
    """
    return jax.make_array_from_process_local_data(batch_sharded(mesh), batch)


def jit_train_step(step: Callable, mesh: Mesh | None = None) -> Callable:
    """``jax.jit`` of a ``(states, batch, rng) -> (states, metrics)`` step: states replicated and donated, batch
    split over ``data``, rng replicated; new states and metrics replicated. Default mesh: :func:`make_mesh`.
    """
    mesh = make_mesh() if mesh is None else mesh
    rep = replicated(mesh)
    return jax.jit(step, in_shardings=(rep, batch_sharded(mesh), rep), out_shardings=rep, donate_argnums=(0,))


def host_batch_size(per_device: int) -> int:
    """The batch this host's pipeline yields per step: ``per_device`` for each of its local devices."""
    return per_device * jax.local_device_count()


def data_shard(config: ml_collections.ConfigDict) -> grain.sharding.ShardOptions:
    """This host's share of the patch stream: every ``process_count``-th patch if ``config.distributed``, else all."""
    if config.get("distributed", False):
        return grain.sharding.ShardByJaxProcess()
    return grain.sharding.NoSharding()


def forced_host_devices_env(devices: int, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a child process whose CPU backend has ``devices`` devices (``XLA_FLAGS`` keeps its other
    flags): the device count is fixed when JAX starts, so tests and benchmarks set it per subprocess."""
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return {**env, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])}
