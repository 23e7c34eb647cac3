"""The resumable training loop both phases run, written so the host never waits on the device between logs.

The loop draws one batch per step from a grain iterator, runs a jitted pure step ``(states, batch) -> (states,
metrics)``, and saves through Orbax. The step's metrics, the NaN guard's counts and its stop stay on the device
(:mod:`cmfl_jax.training.window`); the loop reads them every ``train.log_every`` steps, before a save and before
a hook (preview, validation), and logs the means over the steps since the last log. The next batch is prepared
and sent to the device while the current step runs (one ahead). A workdir with a checkpoint resumes from it: the
states and the iterator state come back, so the resumed run sees exactly the batches an uninterrupted run would
have seen.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from cmfl_jax import checkpoints, sharding
from cmfl_jax.data.pipeline import patch_dataset
from cmfl_jax.run_log import RunLog
from cmfl_jax.training import window as window_lib
from cmfl_jax.training.fit_support import QuietLog, StopRequest, check_params_finite, report_nonfinite, resume


def training_patches(config: ml_collections.ConfigDict, entries: list):
    """The seeded patch stream of a phase's config: this host's share of the global batch (both phases)."""
    d = config.data
    return patch_dataset(entries, d.patch_size, seed=config.seed,
                         batch_size=sharding.host_batch_size(config.train.batch_size), tumour_prob=d.tumour_prob,
                         flip=d.flip, num_workers=d.num_workers, shard=sharding.data_shard(config),
                         augment=d.augment)


def device_batch(batch: dict, keys: tuple[str, ...] = ("image",)) -> dict:
    """The pipeline's ``keys`` the step takes, still host arrays: the loop sends them (:func:`to_device`); with
    ``augment.where="device"`` also the drawn numbers, ``augment``, which the phase's ``augment`` applies."""
    keys = (*keys, "augment") if "augment" in batch else keys
    return {k: batch[k] for k in keys}


def to_device(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Host arrays -> global arrays split over ``data`` (an asynchronous copy). The cache may hold float16
    images; the cast to float32 runs on the device (exact), where numpy's costs ~2 ns per value on the host."""
    out = sharding.shard_batch(batch, mesh)
    if "image" in out:
        out["image"] = out["image"].astype(jnp.float32)
    return out


@dataclasses.dataclass
class Phase:
    """A training phase as the loop sees it.

    Attributes:
      name: prefix of log lines and metrics (``cmft``, ``cmff``).
      states: the named train states (one Orbax item each).
      step_fn: jitted ``(states, batch) -> (states, metrics)``; may donate ``states``.
      to_batch: host batch from the pipeline -> the host arrays the step takes.
      on_step: called after the steps where ``on_step_due`` holds with ``(step, states, batch)``; returns
        metrics to log or None (previews, validation).
      on_step_due: ``step -> bool``; None: every step (then the loop reads the NaN guard after every step).
      augment: ``(device batch, mesh) -> device batch``, run on each batch before the step
        (:func:`cmfl_jax.data.device_augment.device_augmentation`); None: the batch goes to the step as it is.
    """

    name: str
    states: dict
    step_fn: Callable
    to_batch: Callable[[dict], Any]
    on_step: Callable[[int, dict, Any], Mapping[str, float] | None] | None = None
    on_step_due: Callable[[int], bool] | None = None
    augment: Callable[[dict, jax.sharding.Mesh], dict] | None = None

    def send(self, batch: dict, mesh: jax.sharding.Mesh) -> dict:
        """A pipeline batch on the device (asynchronous), augmented there if the phase does so."""
        batch = to_device(self.to_batch(batch), mesh)
        return batch if self.augment is None else self.augment(batch, mesh)


def _stop_requested(stop: StopRequest, step: int, train: ml_collections.ConfigDict) -> bool:
    """Whether a signal asked to stop after ``step``. With several processes the question is a collective (a
    device round trip), asked at log and save steps only: the stop comes at the next of those."""
    if jax.process_count() == 1:
        return stop.signal is not None
    if step % train.log_every and step % train.save_every and step != train.steps:
        return False
    return sharding.any_process(stop.signal is not None)


def _train(phase: Phase, states: dict, start: int, iterator, mesh, manager, log, train: ml_collections.ConfigDict,
           stop: StopRequest) -> tuple[dict, int]:
    """Steps ``start + 1`` to ``train.steps``; returns the states and the last finished step."""
    window, done = None, start
    upcoming = phase.send(next(iterator), mesh) if start < train.steps else None
    for step in range(start + 1, train.steps + 1):
        batch = upcoming
        states, metrics = phase.step_fn(states, batch)
        if window is None:
            window = sharding.replicate(window_lib.empty(metrics), mesh)
        window = window_lib.add(window, metrics, step, limit=train.max_nonfinite)
        stopping = _stop_requested(stop, step, train)
        save = step % train.save_every == 0 or step == train.steps or stopping
        data = iterator.get_state() if save else None  # before the next batch is drawn
        if step < train.steps and not stopping:  # the next batch goes to the device while this step runs
            upcoming = phase.send(next(iterator), mesh)
        hook = phase.on_step is not None and (phase.on_step_due is None or phase.on_step_due(step))
        logs = step % train.log_every == 0 or step == train.steps
        means = None
        if logs or save or hook:  # the only reads of the device between logs
            host = window_lib.read(window)
            if logs or host["stop_step"]:
                means = window_lib.summary(host)
                if not means["skipped"]:
                    means.pop("skipped")
                log.write(int(host["stop_step"]) or step, means)
                report_nonfinite(phase.name, step, host, train.max_nonfinite)  # raises at the guard's stop
                window = sharding.replicate(window_lib.restart(window), mesh)
        log.progress(step, means)
        extra = phase.on_step(step, states, batch) if hook else None
        if extra:
            log.write(step, extra, prefix="val")
        done = step
        if save:
            check_params_finite(states, step)
            meta = {"step": step, "data": data, "processes": jax.process_count()}
            checkpoints.save(manager, step, states, meta, force=True)
        if stopping:
            why = f"signal {stop.signal}" if stop.signal is not None else "another process was signalled"
            logging.info("%s: %s: stopped after step %d, saved; run the same command to resume", phase.name, why, step)
            break
    return states, done


def fit(phase: Phase, dataset, train: ml_collections.ConfigDict, workdir: str) -> tuple[dict, int]:
    """Run ``phase`` for ``train.steps`` steps, resuming from ``workdir`` when it holds a checkpoint.

    Returns the states and the last finished step: ``train.steps``, or less when a SIGTERM/SIGINT stopped
    the run (its step is saved first, so running the same command again resumes there). The states are
    replicated over all devices and each batch is split over them (:mod:`cmfl_jax.sharding`).

    The NaN guard skips the same updates as a check after every step would, and stops at the same step
    (``train.max_nonfinite`` in a row, nothing saved at or after it), but the loop learns of the stop at its
    next read of the device: the next log, save or hook step. The steps run in between change nothing on disk.

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
        states, start = resume(phase.name, sharding.replicate(phase.states, mesh), manager, iterator)
        if sharding.is_primary():  # one metrics.jsonl and TensorBoard log in the shared workdir
            log = RunLog(workdir, train.steps, start, desc=phase.name, log_every=train.log_every)
        else:
            log = QuietLog()
        with StopRequest() as stop:
            states, done = _train(phase, states, start, iterator, mesh, manager, log, train, stop)
    finally:
        if log is not None:
            log.close()
        checkpoints.close(manager)
        if hasattr(iterator, "close"):
            iterator.close()
    return states, done
