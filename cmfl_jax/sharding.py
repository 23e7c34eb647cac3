"""Data parallelism with JAX's own SPMD: one mesh axis ``data``, the batch split over it, the states replicated.

Both phases jit their one train step with these shardings (:func:`jit_train_step`); XLA inserts the
gradient all-reduce, so a step on N devices computes what one device computes on the same global batch.
``config.train.batch_size`` is the batch per device: the global batch is that times ``jax.device_count()``,
and each host's data pipeline yields its ``batch_size * jax.local_device_count()`` share
(:func:`host_batch_size`, :func:`data_shard`). With ``config.distributed.enabled`` several processes (hosts)
join through :func:`initialize_distributed` before JAX touches a device (docs/multi_host.md). One device is
the degenerate mesh: the same step, the same numbers as without a mesh.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cmfl_jax.errors import CMFLError

DATA_AXIS = "data"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise CMFLError(name, f"must be an integer, got {value!r}") from None


def distributed_settings(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The keyword arguments of ``jax.distributed.initialize`` for this process, or None when not distributed.

    ``config.distributed`` is the block of ``configs/cmft.py`` (``enabled``, ``coordinator_address``,
    ``num_processes``, ``process_id``) or, as in older config files, a bool. Each empty value (``""``, ``0``,
    ``-1``) falls back to ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
    (the variables Orbax's and many launchers' scripts set; JAX itself reads only the first), and what is still
    unset is left to JAX's cluster detection (SLURM, Open MPI, Cloud TPU, Kubernetes).
    """
    block = config.get("distributed", False)
    if isinstance(block, bool):  # older config files: True leaves everything to the environment
        block = ml_collections.ConfigDict({"enabled": block})
    if not block.get("enabled", False):
        return None
    address = block.get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip()
    count = block.get("num_processes", 0)
    count = count if count > 0 else _env_int("JAX_NUM_PROCESSES")
    index = block.get("process_id", -1)
    index = index if index >= 0 else _env_int("JAX_PROCESS_ID")
    if count is not None and index is not None and not 0 <= index < count:
        raise CMFLError("config.distributed.process_id", f"must lie in [0, num_processes={count}), got {index}")
    settings = {"coordinator_address": address or None, "num_processes": count, "process_id": index}
    return {k: v for k, v in settings.items() if v is not None}


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Join the other processes (``jax.distributed.initialize``) if ``config.distributed`` asks for it.

    Must run before anything asks JAX for its devices; a second call is a no-op. On CPU the cross-process
    all-reduce goes through gloo (over TCP): selected here unless another implementation (``mpi``) was set.
    """
    settings = distributed_settings(config)
    if settings is None or jax.distributed.is_initialized():
        return
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**settings)
    except (ValueError, TypeError) as e:  # nothing set and no cluster detected, or a bad value
        raise CMFLError("config.distributed", f"cannot join the other processes: {e} (set coordinator_address, "
                                              f"num_processes, process_id or JAX_COORDINATOR_ADDRESS, "
                                              f"JAX_NUM_PROCESSES, JAX_PROCESS_ID)") from e
    logging.info("distributed: process %d of %d, %d local and %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """Whether this is process 0, the one that writes the shared files (logs; Orbax decides for checkpoints)."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process; every process must call this at the same point (a collective)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def barrier(name: str) -> None:
    """Wait until every process got here (no-op with one process); ``name`` must be the same on all."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


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
    """``jax.jit`` of a ``(states, batch) -> (states, metrics)`` step: states replicated and donated, batch
    split over ``data``; new states and metrics replicated. Default mesh: :func:`make_mesh`.
    """
    mesh = make_mesh() if mesh is None else mesh
    rep = replicated(mesh)
    return jax.jit(step, in_shardings=(rep, batch_sharded(mesh)), out_shardings=rep, donate_argnums=(0,))


def host_batch_size(per_device: int) -> int:
    """The batch this host's pipeline yields per step: ``per_device`` for each of its local devices."""
    return per_device * jax.local_device_count()


def data_shard(config: ml_collections.ConfigDict) -> grain.sharding.ShardOptions:
    """This process's share of the patch stream: every ``process_count``-th patch, starting at its index, when
    several processes train together (after :func:`initialize_distributed`); all of it with one."""
    del config  # the processes that joined decide, not the flag
    if jax.process_count() > 1:
        return grain.sharding.ShardByJaxProcess()
    return grain.sharding.NoSharding()
