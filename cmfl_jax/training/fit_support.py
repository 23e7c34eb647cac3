"""What the training loop needs beside its steps: the stop on a signal, the quiet log of the other processes,
the NaN guard's report, the finiteness check before a save and the resume from a checkpoint."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from absl import logging

from cmfl_jax import checkpoints
from cmfl_jax.errors import CMFLError
from cmfl_jax.training.state import all_finite


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


class QuietLog:
    """The run log of every process but the first: the metrics are the same on all, process 0 writes them."""

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        pass

    def progress(self, step: int, metrics: dict | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def report_nonfinite(name: str, step: int, window: dict, limit: int) -> None:
    """Log the updates the NaN guard skipped in a window read at ``step``; stop the run (nothing saved) when the
    count in a row reached ``limit`` (at ``window["stop_step"]``, at or before ``step``)."""
    skipped, stop_at = int(window["skipped"]), int(window["stop_step"])
    if skipped:
        bad = ", ".join(k for k, v in window["bad"].items() if v) or "a gradient"
        logging.warning("%s steps to %d: %d updates skipped (non-finite %s; %d in a row)", name,
                        stop_at or step, skipped, bad, int(window["in_a_row"]))
    if stop_at:
        raise CMFLError("config.train.max_nonfinite",
                        f"{name} step {stop_at}: {limit} steps in a row with a non-finite loss or gradient; stopped "
                        f"(the last checkpoint is intact: lower the learning rate or check the data, then resume)")


# One compiled check per params tree (called eagerly, all_finite compiles an isfinite and a reduction per leaf
# shape: ~60 small compiles, seconds at the first save of every run).
_all_finite_jit = jax.jit(all_finite)


def check_params_finite(states: dict, step: int) -> None:
    """A checkpoint never holds NaN/Inf params (the guard should make this unreachable)."""
    for name, state in states.items():
        if hasattr(state, "params") and not bool(_all_finite_jit(state.params)):
            raise CMFLError(f"states[{name!r}]", f"non-finite parameters at step {step}; not saved")


def resume(name: str, states: dict, manager, iterator) -> tuple[dict, int]:
    """(states, step) from the manager's latest checkpoint (restored onto the shardings of ``states``), the
    iterator moved to its position; ``states`` and 0 when there is none."""
    if manager.latest_step() is None:
        return states, 0
    states, meta = checkpoints.restore(manager, states)
    iterator.set_state(meta["data"])
    if meta.get("processes", 1) != jax.process_count():
        logging.warning("%s: the checkpoint was saved by %d processes, this run has %d: the states are the same, but "
                        "each process's data position counts batches of its own share, so the patches that follow "
                        "differ from an uninterrupted run", name, meta.get("processes", 1), jax.process_count())
    logging.info("%s: resumed from step %d of %s", name, int(meta["step"]), manager.directory)
    return states, int(meta["step"])
