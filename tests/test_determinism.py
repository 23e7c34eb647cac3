"""The same command with the same seed gives bit-identical params and metrics.

In one process (a tiny CMFF and a tiny CMFT run twice into two workdirs) and across processes (the CLI: the
in-process run again with an empty, then a warm compilation cache, an empty, then a warm data cache, and with
two grain worker processes). A different seed gives different params, so the comparisons can fail.

What is not the same: another commit whose train step compiles to another XLA program. The NaN guard (825851f:
``jnp.where(finite, new, old)`` and ``isfinite`` reductions in the step) changed no formula but changed float
rounding: configs/cmff.py:smoke at c53fe5a and at 61eea95 (the guard, nothing else on that path) differs in 285
of 320 arrays after 3 steps and by 1.1e-5 after 6, while 61eea95 and e1fbcac (the data-parallel jit) agree bit for
bit. docs/results.md's held-out ET Dice 0.7220 and 0.7318 are demo runs of c53fe5a's code (its configs/demo.py
quotes ET 0.72, WT 0.91, TC 0.87) and of e1fbcac's: they differ by this rounding, grown over 750 training steps
(the size of the growth is inferred, not rerun). Two runs of the default demo on one commit (the code of
f208600), one from empty caches and one from warm ones, the first stopped by SIGTERM at CMFF step 111 and
resumed, agree bit for bit: every param and optimizer array of the CMFT and CMFF checkpoints, every logged loss
and validation metric (all but ``val/seconds``), the predicted volumes, and the summary (held-out Dice ET
0.7158, WT 0.9016, TC 0.8811).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from cmfl_jax import checkpoints
from cmfl_jax.jobs.cmff import train as train_cmff
from cmfl_jax.training.cmff_step import create_state

from .conftest import REPO, write_tiny_dataset
from .test_cmff_train import PATCH, tiny_cmff_config

CMFF = {"init.mode": "random"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism_data")
    write_tiny_dataset(root, n=3)
    return root


def flat_params(states) -> dict[str, np.ndarray]:
    return {f"{name}/{k}": np.asarray(v) for name, state in states.items()
            for k, v in traverse_util.flatten_dict(jax.device_get(state.params), sep="/").items()}


def metric_lines(workdir) -> list[dict]:
    """metrics.jsonl without wall-clock timings (``val/seconds``), the one thing that differs run to run."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    return [{k: v for k, v in x.items() if not any(t in k for t in ("time", "sec", "rate"))} for x in lines]


def assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} leaves differ, e.g. {differ[0]}"


def assert_differ(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert any(not np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def cmff_runs(tmp_path_factory, data_root) -> dict[str, tuple[dict[str, np.ndarray], list[dict]]]:
    """The tiny CMFF in this process: twice with seed 0, once with seed 1; (final params, metrics) of each."""
    runs = {}
    with pytest.MonkeyPatch.context() as env:  # set up before the per-test private_cache: a data cache of its own
        env.setenv("CMFL_JAX_CACHE", str(tmp_path_factory.mktemp("cmff_cache")))
        for name, seed in (("a", 0), ("b", 0), ("seed1", 1)):
            workdir = tmp_path_factory.mktemp(f"cmff_{name}")
            config = tiny_cmff_config(data_root, steps=3, **CMFF)
            config.seed = seed
            runs[name] = flat_params(train_cmff(config, str(workdir))), metric_lines(workdir)
    return runs


def test_cmff_twice_in_one_process_is_bit_identical_and_another_seed_is_not(cmff_runs):
    (params, metrics), (params_b, metrics_b), (params_1, metrics_1) = (cmff_runs[k] for k in ("a", "b", "seed1"))
    assert_bit_identical(params, params_b)
    assert metrics == metrics_b
    assert [x["step"] for x in metrics if "train/loss" in x] == [1, 2, 3]
    assert any("val/dice_mean" in x for x in metrics)
    assert_differ(params, params_1)
    assert metrics != metrics_1


def cli_cmff(data_root, workdir, compile_cache, num_workers: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The tiny CMFF through the CLI in a fresh process with its own compilation cache; its final params."""
    args = [f"--config={os.path.join(REPO, 'configs', 'cmff.py')}:smoke", f"--workdir={workdir}",
            f"--config.data.root={data_root}", f"--config.data.patch_size=({PATCH},{PATCH},{PATCH})",
            "--config.model.base=2", "--config.model.depth=2", "--config.model.conv_impl=native",
            "--config.train.steps=3", "--config.data.split.folds=3", "--config.val.every=3",
            f"--config.data.num_workers={num_workers}", f"--config.seed={seed}"]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(compile_cache))
    done = subprocess.run([sys.executable, "-m", "cmfl_jax.main", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    config = tiny_cmff_config(data_root, steps=3, **CMFF)
    with checkpoints.read_only(str(workdir)) as manager:
        assert manager.latest_step() == 3
        states, meta = checkpoints.restore(manager, {"seg": create_state(jax.random.key(123), config)})
    assert meta["step"] == 3
    return flat_params(states)


def test_cli_runs_are_bit_identical_across_processes_compile_caches_and_grain_workers(tmp_path, data_root, cmff_runs):
    params, metrics = cmff_runs["a"]
    cold = tmp_path / "compile_cold"
    cold.mkdir()
    # a fresh process, an empty compilation cache, an empty data cache: as the in-process run
    assert_bit_identical(params, cli_cmff(data_root, tmp_path / "cold", cold, num_workers=0))
    assert metric_lines(tmp_path / "cold") == metrics
    assert os.listdir(cold), "the first run filled its compilation cache"
    # again with the executables from that compilation cache, the subjects from the data cache, and two grain
    # worker processes cutting the patches instead of the main process's reader threads
    assert_bit_identical(params, cli_cmff(data_root, tmp_path / "workers", cold, num_workers=2))
    assert metric_lines(tmp_path / "workers") == metrics
