"""Phase 1 (CMFT): separate optimizer states, variants.

Exact resume (the params and the per-step losses of an uninterrupted run after a kill -9 and a rerun) is
tests/test_crash_resume.py's; a signal's save and resume is tests/test_preemption.py's."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax.config_variants import load_config
from cmfl_jax.jobs.cmft import train as train_cmft
from cmfl_jax.training.cmft_step import create_states, make_train_step

from .conftest import write_tiny_dataset


def tiny_config(root, steps=3, **overrides):
    config = load_config("cmft:smoke")
    config.data.root = str(root)
    config.data.patch_size = (32, 32, 32)
    config.train.steps = steps
    config.train.preview_every = 0
    config.model.conv_impl = "native"
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmft_data")
    write_tiny_dataset(root, n=3)
    return root


def tree_equal(a, b, atol=0.0):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.allclose(x, y, atol=atol, rtol=0)), a, b)))


def one_step(config):
    states = create_states(jax.random.key(0), config)
    before = jax.tree.map(np.array, {k: s.params for k, s in states.items()})
    batch = {"image": jax.random.normal(jax.random.key(1), (1, 32, 32, 32, 4))}
    new_states, metrics = make_train_step(config)(states, batch)
    after = jax.tree.map(np.array, {k: s.params for k, s in new_states.items()})
    return before, after, metrics


def test_one_step_changes_all_four_networks(data_root):
    before, after, metrics = one_step(tiny_config(data_root))
    assert set(after) == {"g_ab", "g_ba", "d_a", "d_b"}
    for name in after:
        assert not tree_equal(before[name], after[name]), name
    assert {"g_adv", "cycle", "g_total", "d_a", "d_b"} <= set(metrics)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_optimizer_states_are_separate(data_root):
    before, after, _ = one_step(tiny_config(data_root, **{"cmft.g_lr": 0.0}))
    assert tree_equal(before["g_ab"], after["g_ab"]) and tree_equal(before["g_ba"], after["g_ba"])
    assert not tree_equal(before["d_a"], after["d_a"]) and not tree_equal(before["d_b"], after["d_b"])


@pytest.mark.parametrize("override", [{"data.pairing": "t1-flair/t2-t1ce"}, {"cmft.objective": "self"}])
def test_variants_train(data_root, tmp_path, override):
    config = tiny_config(data_root, steps=2, **override)
    config.train.preview_every = 2
    states = train_cmft(config, str(tmp_path))
    expected = {"g_aa", "g_bb", "d_a", "d_b"} if "cmft.objective" in override else {"g_ab", "g_ba", "d_a", "d_b"}
    assert set(states) == expected
    assert os.path.isfile(tmp_path / "previews" / "cmft_0000002.png")
    assert all(bool(jnp.all(jnp.isfinite(x))) for s in states.values() for x in jax.tree.leaves(s.params))
