"""The loop never waits on the device between logs, and what it logs is the mean of the steps in between.

A toy phase (one scalar parameter pulled towards each batch's value, the real NaN guard, the real jitted step
wrapper) runs through :func:`cmfl_jax.training.loop.fit`. Every way a ``jax.Array`` reaches the host
(``float``, ``bool``, ``np.asarray``, ``np.array``, ``jax.device_get``, ``item``, ``tolist``,
``block_until_ready``) is counted; between two reads of the metrics window there must be none. On an
accelerator the device-to-host transfer guard also forbids them (on the CPU it has nothing to guard).
"""

from __future__ import annotations

import json

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax._src import array as jax_array

from cmfl_jax import checkpoints, sharding
from cmfl_jax.config_defaults import train_config
from cmfl_jax.errors import CMFLError
from cmfl_jax.training import loop, state
from cmfl_jax.training import window as window_lib

BAD = float("nan")


def values(n: int, bad: set[int] = frozenset()) -> list[float]:
    """The value of batch k (1-based): distinct, NaN at the steps in ``bad``."""
    return [BAD if k in bad else 0.5 * k - 1.0 for k in range(1, n + 1)]


def toy_phase(vals: list[float]) -> tuple[loop.Phase, grain.IterDataset]:
    def step(states, batch):
        s = states["toy"]

        def loss_fn(params):
            return jnp.mean((params["w"] - batch["image"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(s.params)
        metrics = {"loss": loss, "value": jnp.mean(batch["image"])}
        return state.skip_nonfinite(states, {"toy": s.apply_gradients(grads=grads)}, metrics, grads)

    toy = train_state.TrainState.create(apply_fn=None, params={"w": jnp.zeros(())}, tx=optax.sgd(0.1))
    dataset = grain.MapDataset.source(vals).map(
        lambda v: {"image": np.full((jax.device_count(), 2, 2, 2, 1), v, np.float32)}).to_iter_dataset()
    return loop.Phase("toy", {"toy": toy}, sharding.jit_train_step(step), to_batch=loop.device_batch), dataset


def train(steps: int, **kw) -> ml_collections.ConfigDict:
    config = train_config(steps)
    config.update({"save_every": 1000, "max_to_keep": None, **kw})
    return config


def logged(workdir) -> dict[int, dict]:
    return {x["step"]: x for x in map(json.loads, open(workdir / "metrics.jsonl"))}


@pytest.fixture
def host_reads(monkeypatch) -> list:
    """Every read of a ``jax.Array`` by the host, in order, between the markers the test adds."""
    events = []

    def counted(name, f):
        def wrapper(self, *args, **kwargs):
            events.append(name)
            return f(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(counted("_value", jax_array.ArrayImpl._value.fget)))
    for name in ("__array__", "item", "tolist", "block_until_ready", "copy_to_host_async"):
        monkeypatch.setattr(jax_array.ArrayImpl, name, counted(name, getattr(jax_array.ArrayImpl, name)))

    def numpy_counted(name, f):  # a CPU array reaches numpy through the buffer protocol, not __array__
        def wrapper(x, *args, **kwargs):
            if isinstance(x, jax.Array):
                events.append(f"np.{name}")
            return f(x, *args, **kwargs)
        return wrapper

    for name in ("asarray", "array"):
        monkeypatch.setattr(np, name, numpy_counted(name, getattr(np, name)))
    return events


def test_no_host_read_between_two_logs(tmp_path, host_reads, monkeypatch):
    steps, every = 12, 4
    phase, dataset = toy_phase(values(steps))
    real_step, real_read = phase.step_fn, window_lib.read

    def step_fn(states, batch):
        host_reads.append("step")
        jax.config.update("jax_transfer_guard_device_to_host", "disallow")
        return real_step(states, batch)

    def read(window):
        jax.config.update("jax_transfer_guard_device_to_host", "allow")
        host_reads.append("read")
        out = real_read(window)
        host_reads.append("read done")
        return out

    phase.step_fn = step_fn
    monkeypatch.setattr(window_lib, "read", read)
    try:
        loop.fit(phase, dataset, train(steps, log_every=every), str(tmp_path))
    finally:
        jax.config.update("jax_transfer_guard_device_to_host", "allow")
    first = host_reads.index("step")
    windows = " ".join(host_reads[first:]).split("read done")
    between = [w.split("read")[0].split() for w in windows[:-1]]  # from a read's end to the next read
    assert between == [["step"] * every] * (steps // every), host_reads
    assert sorted(logged(tmp_path)) == [4, 8, 12]


def test_logged_means_are_the_means_of_the_steps_the_guard_kept(tmp_path):
    steps, every = 10, 3
    vals = values(steps, bad={5})
    phase, dataset = toy_phase(vals)
    loop.fit(phase, dataset, train(steps, log_every=1), str(tmp_path / "each"))
    phase, dataset = toy_phase(vals)
    loop.fit(phase, dataset, train(steps, log_every=every), str(tmp_path / "windows"))
    each, windows = logged(tmp_path / "each"), logged(tmp_path / "windows")
    assert sorted(each) == list(range(1, steps + 1)) and sorted(windows) == [3, 6, 9, 10]
    assert np.isnan(each[5]["train/value"]) and each[5]["train/skipped"] == 1.0
    for end, start in ((3, 1), (6, 4), (9, 7), (10, 10)):
        kept = [k for k in range(start, end + 1) if k != 5]
        for key in ("train/loss", "train/value"):
            np.testing.assert_allclose(windows[end][key], np.mean([each[k][key] for k in kept]), rtol=1e-6)
        np.testing.assert_allclose(windows[end]["train/value"], np.mean([vals[k - 1] for k in kept]), rtol=1e-6)
        assert windows[end].get("train/skipped", 0.0) == (1.0 if end == 6 else 0.0)


def test_the_guard_stops_at_the_same_step_when_it_reads_later(tmp_path):
    """Bad steps 7, 8, 9 with a limit of 3: the stop is step 9, found at the read of step 10, nothing saved
    after step 5; the logged window ends at the stop and averages the one step it kept (6)."""
    phase, dataset = toy_phase(values(20, bad={2, 7, 8, 9}))
    config = train(20, log_every=5, save_every=5, max_nonfinite=3)
    with pytest.raises(CMFLError, match=r"max_nonfinite: toy step 9: 3 steps in a row"):
        loop.fit(phase, dataset, config, str(tmp_path))
    manager = checkpoints.make_manager(str(tmp_path), None, read_only=True)
    assert manager.all_steps() == [5]
    manager.close()
    lines = logged(tmp_path)
    assert sorted(lines) == [5, 9] and lines[5]["train/skipped"] == 1.0 and lines[9]["train/skipped"] == 3.0
    np.testing.assert_allclose(lines[9]["train/value"], values(20)[5], rtol=1e-6)


def test_a_window_of_a_step_without_the_guard():
    """A step that reports no ``skipped`` is a kept step: its metrics are averaged, nothing is counted."""
    window = window_lib.empty({"loss": 0.0})
    for step, loss in enumerate((1.0, 3.0), start=1):
        window = window_lib.add(window, {"loss": jnp.asarray(loss)}, step, limit=2)
    host = window_lib.read(window)
    assert window_lib.summary(host) == {"loss": 2.0, "skipped": 0.0} and int(host["in_a_row"]) == 0
