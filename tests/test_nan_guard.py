"""The NaN guard: a non-finite loss or gradient skips the update; K in a row stop the run; NaN is never saved."""

from __future__ import annotations

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax import checkpoints
from cmfl_jax.errors import CMFLError
from cmfl_jax.jobs import cmff as cmff_job
from cmfl_jax.training import loop, state
from cmfl_jax.training.cmff_step import create_state
from cmfl_jax.training.cmff_step import make_train_step as make_cmff_step
from cmfl_jax.training.cmft_step import create_states as create_cmft_states
from cmfl_jax.training.cmft_step import make_train_step as make_cmft_step

from .test_cmff_train import PATCH, data_root, flat, tiny_cmff_config  # noqa: F401 (fixture)
from .test_cmft import tiny_config as tiny_cmft_config


def snapshot(states):
    """Host copies of params and optimizer states (the step donates its input buffers)."""
    return jax.tree.map(np.array, {k: (s.params, s.opt_state, s.step) for k, s in states.items()})


def trees_bit_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def cmff_batch(poison: bool):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, PATCH, PATCH, PATCH, 4)).astype(np.float32)
    if poison:
        image[0, 3, 4, 5, 1] = np.nan
    return {"image": image, "label": rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(1, PATCH, PATCH, PATCH))}


def test_cmff_nan_batch_leaves_params_and_optimizer_unchanged(data_root):  # noqa: F811
    config = tiny_cmff_config(data_root, **{"init.mode": "random"})
    step = make_cmff_step(config)
    states = {"seg": create_state(jax.random.key(0), config)}
    before = snapshot(states)
    states, metrics = step(states, cmff_batch(poison=True))
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert trees_bit_equal(snapshot(states), before)
    states, metrics = step(states, cmff_batch(poison=False))
    assert float(metrics["skipped"]) == 0.0
    after = snapshot(states)
    assert int(after["seg"][2]) == 1 and not trees_bit_equal(after["seg"][0], before["seg"][0])


def test_cmft_nan_batch_leaves_all_four_networks_unchanged(data_root):  # noqa: F811
    config = tiny_cmft_config(data_root)
    states = create_cmft_states(jax.random.key(0), config)
    before = snapshot(states)
    image = np.array(jax.random.normal(jax.random.key(1), (1, 32, 32, 32, 4)))
    image[0, 0, 0, 0, 3] = np.inf
    states, metrics = make_cmft_step(config)(states, {"image": jnp.asarray(image)})
    assert float(metrics["skipped"]) == 1.0
    assert set(states) == {"g_ab", "g_ba", "d_a", "d_b"}
    assert trees_bit_equal(snapshot(states), before)


def poisoned_phase(bad_steps: set[int]):
    """A Phase whose batches at ``bad_steps`` (1-based, counted from the run's start) carry one NaN voxel."""

    @dataclasses.dataclass
    class Poisoned(loop.Phase):
        def __post_init__(self):
            inner, calls = self.to_batch, itertools.count(1)

            def to_batch(b):
                batch = inner(b)
                if next(calls) in bad_steps:  # a host batch (the loop sends it to the device)
                    image = np.array(batch["image"], np.float32)
                    image[0, 0, 0, 0, 0] = np.nan
                    batch = {**batch, "image": image}
                return batch

            self.to_batch = to_batch

    return Poisoned


def test_isolated_nan_is_skipped_and_k_in_a_row_stop_without_saving_nan(tmp_path, data_root, monkeypatch):  # noqa: F811
    monkeypatch.setattr(cmff_job, "Phase", poisoned_phase({2, 5, 6, 7}))
    config = tiny_cmff_config(data_root, steps=9, **{"init.mode": "random", "train.save_every": 3,
                                                     "train.max_nonfinite": 3, "val.every": 100})
    with pytest.raises(CMFLError, match=r"config.train.max_nonfinite: cmff step 7: 3 steps in a row with a "
                                        r"non-finite loss or gradient; stopped"):
        cmff_job.train(config, str(tmp_path))
    # Step 2's NaN was skipped and training went on; the checkpoints at 3 and 6 exist and are finite;
    # nothing was saved at or after the stop.
    manager = checkpoints.make_manager(str(tmp_path), None, read_only=True)
    assert sorted(manager.all_steps()) == [3, 6]
    target = {"seg": create_state(jax.random.key(0), config)}
    for step in (3, 6):
        states, meta = checkpoints.restore(manager, target, step=step)
        assert meta["step"] == step and bool(state.all_finite(states["seg"].params))
        assert int(states["seg"].step) == {3: 2, 6: 3}[step]  # applied updates: 1, 3 (not 2); then 4 (not 5, 6)
    manager.close()
    assert checkpoints.latest_step(str(tmp_path), "final") is None
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    losses = {x["step"]: x["train/loss"] for x in lines if "train/loss" in x}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6, 7]
    assert [s for s, v in losses.items() if not np.isfinite(v)] == [2, 5, 6, 7]
