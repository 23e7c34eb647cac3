"""The resumable training loop both phases run.

The loop draws one batch per step from a grain iterator, runs a jitted pure step
``(states, batch, rng) -> (states, metrics)`` with ``rng = fold_in(root_rng, step)``, logs,
and saves through Orbax. A workdir with a checkpoint resumes from it: the states, the root
RNG and the iterator state come back, so the resumed run sees exactly the batches and the
random numbers an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cmfl_jax import checkpoints, sharding
from cmfl_jax.data.pipeline import patch_dataset
from cmfl_jax.errors import CMFLError
from cmfl_jax.run_log import RunLog
from cmfl_jax.training.state import all_finite


def training_patches(config: ml_collections.ConfigDict, entries: list):
    """The seeded patch stream of a phase's config: this host's share of the global batch (both phases)."""
    d = config.data
    return patch_dataset(entries, d.patch_size, seed=config.seed,
                         batch_size=sharding.host_batch_size(config.train.batch_size), tumour_prob=d.tumour_prob,
                         flip=d.flip, num_workers=d.num_workers, shard=sharding.data_shard(config),
                         augment=d.augment)


def device_batch(batch: dict, keys: tuple[str, ...] = ("image",)) -> dict:
    """The pipeline's ``keys`` as the steps take them: on the device, the image as float32. The cache may hold
    float16 images; the cast runs on the device (exact), where numpy's costs ~2 ns per value on the host."""
    out = {k: jnp.asarray(batch[k]) for k in keys}
    out["image"] = out["image"].astype(jnp.float32)
    return out


@dataclasses.dataclass
class Phase:
    """A training phase as the loop sees it.

    Attributes:
      name: prefix of log lines and metrics (``cmft``, ``cmff``).
      states: the named train states (one Orbax item each).
      step_fn: jitted ``(states, batch, rng) -> (states, metrics)``; may donate ``states``.
      to_batch: host batch from the pipeline -> arrays the step takes.
      on_step: called after every step with ``(step, states, batch)``; returns metrics to log or None
        (previews, validation).
    """

    name: str
    states: dict
    step_fn: Callable
    to_batch: Callable[[dict], Any]
    on_step: Callable[[int, dict, Any], Mapping[str, float] | None] | None = None


class StopRequest:
    """SIGTERM/SIGINT while training: finish the current step, save it, and return (preemptible VMs, Ctrl-C).
    With several processes a signal to any one of them stops all of them after the same step.

    A second signal is not caught again: it interrupts at once (the last checkpoint stays valid).
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one acts at once

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _QuietLog:
    """The run log of every process but the first: the metrics are the same on all, process 0 writes them."""

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        pass

    def progress(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _report_nonfinite(name: str, step: int, in_a_row: int, limit: int, metrics: dict) -> None:
    """Log a step the NaN guard skipped; stop the run (nothing saved) after ``limit`` in a row."""
    bad = ", ".join(k for k, v in metrics.items() if not np.isfinite(v)) or "a gradient"
    logging.warning("%s step %d: non-finite %s; update skipped (%d in a row)", name, step, bad, in_a_row)
    if in_a_row >= limit:
        raise CMFLError("config.train.max_nonfinite",
                        f"{name} step {step}: {in_a_row} steps in a row with a non-finite loss or gradient; stopped "
                        f"(the last checkpoint is intact: lower the learning rate or check the data, then resume)")


# One compiled check per params tree (called eagerly, all_finite compiles an isfinite and a reduction per leaf
# shape: ~60 small compiles, seconds at the first save of every run).
_all_finite_jit = jax.jit(all_finite)


def _check_params_finite(states: dict, step: int) -> None:
    """A checkpoint never holds NaN/Inf params (the guard should make this unreachable)."""
    for name, state in states.items():
        if not bool(_all_finite_jit(state.params)):
            raise CMFLError(f"states[{name!r}]", f"non-finite parameters at step {step}; not saved")


def _resume(name: str, states: dict, manager, iterator, seed: int) -> tuple[dict, jax.Array, int]:
    """(states, root RNG, step) from the manager's latest checkpoint (restored onto the shardings of
    ``states``), the iterator moved to its position; ``states``, ``key(seed)`` and 0 when there is none."""
    if manager.latest_step() is None:
        return states, jax.random.key(seed), 0
    states, meta = checkpoints.restore(manager, states)
    iterator.set_state(meta["data"])
    if meta.get("processes", 1) != jax.process_count():
        logging.warning("%s: the checkpoint was saved by %d processes, this run has %d: the states are the same, but "
                        "each process's data position counts batches of its own share, so the patches that follow "
                        "differ from an uninterrupted run", name, meta.get("processes", 1), jax.process_count())
    logging.info("%s: resumed from step %d of %s", name, int(meta["step"]), manager.directory)
    return states, checkpoints.rng_from_json(meta["rng"]), int(meta["step"])


def fit(phase: Phase, dataset, train: ml_collections.ConfigDict, workdir: str, seed: int) -> tuple[dict, int]:
    """Run ``phase`` for ``train.steps`` steps, resuming from ``workdir`` when it holds a checkpoint.

    Returns the states and the last finished step: ``train.steps``, or less when a SIGTERM/SIGINT stopped
    the run (its step is saved first, so running the same command again resumes there). The states are
    replicated over all devices and each batch is split over them (:mod:`cmfl_jax.sharding`).

    With several processes every one runs this with the same ``workdir`` (a shared filesystem) and its own
    share of the data: all of them call the checkpoint saves (Orbax writes from process 0 and waits for the
    others), process 0 alone writes the metrics log. The iterator state in ``meta`` is process 0's; every
    process has drawn the same number of batches, so it is each one's position in its own share.
    """
    if train.fresh:
        if sharding.is_primary() and os.path.isdir(os.path.join(workdir, "checkpoints")):
            logging.info("config.train.fresh: removing %s", os.path.join(workdir, "checkpoints"))
            shutil.rmtree(os.path.join(workdir, "checkpoints"))
        sharding.barrier(f"{phase.name}: fresh workdir")  # no process opens the checkpoints before they are gone
    manager = checkpoints.make_manager(workdir, train.max_to_keep)
    mesh = sharding.make_mesh()
    iterator = iter(dataset)
    log = None
    try:
        states, rng, start = _resume(phase.name, sharding.replicate(phase.states, mesh), manager, iterator, seed)
        if sharding.is_primary():  # one metrics.jsonl and TensorBoard log in the shared workdir
            log = RunLog(workdir, train.steps, start, desc=phase.name, log_every=train.log_every)
        else:
            log = _QuietLog()
        done, nonfinite = start, 0  # nonfinite: updates skipped in a row by the NaN guard
        with StopRequest() as stop:
            for step in range(start + 1, train.steps + 1):
                batch = sharding.shard_batch(phase.to_batch(next(iterator)), mesh)
                states, metrics = phase.step_fn(states, batch, jax.random.fold_in(rng, step))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                nonfinite = nonfinite + 1 if metrics.pop("skipped", 0.0) else 0
                if step % train.log_every == 0 or step == train.steps or nonfinite:
                    log.write(step, metrics)
                log.progress(step, metrics)
                if nonfinite:
                    _report_nonfinite(phase.name, step, nonfinite, train.max_nonfinite, metrics)
                extra = phase.on_step(step, states, batch) if phase.on_step else None
                if extra:
                    log.write(step, extra, prefix="val")
                done = step
                stopping = sharding.any_process(stop.signal is not None)  # all processes stop at the same step
                if step % train.save_every == 0 or step == train.steps or stopping:
                    _check_params_finite(states, step)
                    meta = {"step": step, "rng": checkpoints.rng_to_json(rng), "data": iterator.get_state(),
                            "processes": jax.process_count()}
                    checkpoints.save(manager, step, states, meta, force=True)
                if stopping:
                    why = f"signal {stop.signal}" if stop.signal is not None else "another process was signalled"
                    logging.info("%s: %s: stopped after step %d, saved; run the same command to resume", phase.name,
                                 why, step)
                    break
    finally:
        if log is not None:
            log.close()
        checkpoints.close(manager)
        if hasattr(iterator, "close"):
            iterator.close()
    return states, done

