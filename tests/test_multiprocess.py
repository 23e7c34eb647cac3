"""Two processes on this machine train as two hosts would: the command line, ``jax.distributed`` (gloo over TCP
on CPU), one CPU device each, each process reading its own half of the patch stream, one shared workdir.

CMFT gets the cluster from the environment a launcher sets (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``), CMFF from ``--config.distributed.*``. Each run is compared with one process on 2 (forced)
devices, the same global batch of 2, data and seed: the same losses at every step, and the same params and Adam
moments after the last step, read back here, in a third process with one device, from the checkpoints both
wrote. One process on 2 devices equals one device but for rounding (tests/test_sharding.py); after several
Adam steps that rounding is amplified (a gradient that cancels to ~0 moves its weight by +-lr), so the
reference is the one with the same reduction: the all-reduce of 2 per-device gradients.
docs/multi_host.md says what this does and does not show.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cmfl_jax import checkpoints
from cmfl_jax.config_variants import load_config
from cmfl_jax.training import cmff_step, cmft_step
from experiments.programs import forced_host_devices_env

from .conftest import REPO, write_tiny_dataset

PROCESSES = 2
TIMEOUT_S = 600  # per run: a loaded 2-core machine compiles slowly
CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# steps, checkpoint interval and job-specific keys; CMFT's discriminator needs 32^3 patches
JOBS = {
    "cmft": {"steps": 2, "save_every": 1, "overrides": {"data.patch_size": (32, 32, 32), "train.preview_every": 0}},
    "cmff": {"steps": 3, "save_every": 2, "overrides": {"data.patch_size": (16, 16, 16), "data.split.folds": 3,
                                                        "val.every": 3}},
}


def _overrides(job: str) -> dict:
    spec = JOBS[job]
    return {"model.base": 2, "model.depth": 2, "model.conv_impl": "native", "train.steps": spec["steps"],
            "train.save_every": spec["save_every"], "train.log_every": 1, "train.batch_size": 1,
            **spec["overrides"]}


def _config(job: str, data_root):
    config = load_config(f"{job}:smoke")
    config.data.root = str(data_root)
    for key, value in _overrides(job).items():
        *path, name = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[name] = value
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flag(value) -> str:
    return f"({', '.join(map(str, value))})" if isinstance(value, tuple) else str(value)


@dataclasses.dataclass
class _Run:
    job: str
    processes: int
    devices: int
    names: list[str]
    procs: list[subprocess.Popen]
    files: list


def _start(job: str, workdir, data_root, logs, *, processes: int, devices: int) -> _Run:
    """Start ``job`` through the command line as ``processes`` processes of ``devices`` CPU devices each."""
    address = f"127.0.0.1:{_free_port()}"
    args = [sys.executable, "-m", "cmfl_jax.main", f"--config=configs/{job}.py:smoke", f"--workdir={workdir}",
            f"--config.data.root={data_root}", *(f"--config.{k}={_flag(v)}" for k, v in _overrides(job).items())]
    run = _Run(job, processes, devices, [], [], [])
    for i in range(processes):
        env = forced_host_devices_env(devices, os.environ)  # conftest's XLA flags and compilation cache are inherited
        for var in CLUSTER_VARS:
            env.pop(var, None)
        extra = []
        if processes > 1:
            extra.append("--config.distributed.enabled=True")
            if job == "cmft":  # what a launcher sets in the environment
                env.update(zip(CLUSTER_VARS, (address, str(processes), str(i)), strict=True))
            else:  # the same as config keys
                extra += [f"--config.distributed.coordinator_address={address}",
                          f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={i}"]
        name = logs / f"{os.path.basename(workdir)}.{i}"
        out, err = open(f"{name}.out", "w"), open(f"{name}.err", "w")  # files, not pipes: nothing can stall
        run.files += [out, err]
        run.names.append(name)
        run.procs.append(subprocess.Popen([*args, *extra], cwd=REPO, env=env, stdout=out, stderr=err))
    return run


def _wait(runs: list[_Run]) -> None:
    """Wait for every process, at most ``TIMEOUT_S``; once one failed the others get 20 s (they would wait for it
    at the next collective until JAX's own timeouts). Fails with their logs unless all exited with 0."""
    procs = [p for run in runs for p in run.procs]
    deadline, failed_at = time.monotonic() + TIMEOUT_S, None
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if failed_at is None and any(p.poll() for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() > failed_at + 20:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for run in runs:
            for f in run.files:
                f.close()
    for run in runs:
        codes = [p.returncode for p in run.procs]
        report = "\n".join(f"--- {name}.{kind}:\n{open(f'{name}.{kind}').read()[-3000:]}"
                           for name in run.names for kind in ("err", "out"))
        assert codes == [0] * run.processes, f"{run.job}, {run.processes} processes: exit codes {codes} (-9: killed " \
                                             f"after {TIMEOUT_S} s or after another process failed)\n{report}"
        if run.processes > 1:
            for i, name in enumerate(run.names):
                assert f"distributed: process {i} of {run.processes}, {run.devices} local and " \
                       f"{run.processes * run.devices} global devices" in open(f"{name}.out").read(), report


def _metrics(workdir) -> dict[int, dict[str, float]]:
    """metrics.jsonl by step; a step written twice (by two processes) fails."""
    out: dict[int, dict[str, float]] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            step, values = row.pop("step"), row
            assert not set(values) & set(out.get(step, {})), f"step {step} logged twice in {workdir}"
            out.setdefault(step, {}).update(values)
    return out


def _assert_complete(directory, steps: list[int], items: set[str]) -> None:
    """Only finished checkpoints (Orbax's step metadata, every item), no temporary folders left behind."""
    assert sorted(os.listdir(directory)) == sorted(map(str, steps)), os.listdir(directory)
    for step in steps:
        folder = os.path.join(directory, str(step))
        assert os.path.isfile(os.path.join(folder, "_CHECKPOINT_METADATA")), os.listdir(folder)
        assert {*items, "meta"} <= set(os.listdir(folder)), os.listdir(folder)


def _targets(job: str, config) -> dict:
    """Freshly made 1-device states (another seed) to restore onto."""
    if job == "cmft":
        return cmft_step.create_states(jax.random.key(123), config)
    return {"seg": cmff_step.create_state(jax.random.key(123), config, resuming=True)}


def _restore(workdir, subdir: str, targets: dict) -> tuple[dict[str, np.ndarray], dict]:
    with checkpoints.read_only(str(workdir), subdir) as manager:
        states, meta = checkpoints.restore(manager, targets)
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(states))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}, meta


def _assert_same_states(what: str, got: dict, want: dict) -> None:
    assert set(got) == set(want) and len(got) > 30, what
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=f"{what} {key}")
    assert any(".mu" in k and np.abs(v).max() > 0 for k, v in want.items()), f"{what}: no gradient reached Adam"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp_data")
    write_tiny_dataset(root, n=3)
    return root


@pytest.mark.parametrize("job", ["cmft", "cmff"])
def test_two_processes_train_like_one_and_their_checkpoints_restore_in_one(job, data_root, tmp_path):
    spec, two, one = JOBS[job], tmp_path / "two", tmp_path / "one"
    t0 = time.monotonic()
    # side by side: the reference does not depend on the 2-process run (and a busy machine shares out by process)
    _wait([_start(job, two, data_root, tmp_path, processes=PROCESSES, devices=1),
           _start(job, one, data_root, tmp_path, processes=1, devices=PROCESSES)])
    seconds = time.monotonic() - t0

    # process 0 alone wrote the log, and every step's losses are the reference's: the same patches, the same step
    logged, expected = _metrics(two), _metrics(one)
    assert sorted(logged) == sorted(expected) == list(range(1, spec["steps"] + 1))
    for step, values in expected.items():
        assert set(logged[step]) == set(values)
        for name, value in values.items():
            if not name.endswith("seconds"):  # wall-clock time of a validation
                assert logged[step][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, name)

    # the checkpoints both processes saved are complete, restore on one device, and hold the reference's states
    config = _config(job, data_root)
    targets = _targets(job, config)
    saves = sorted({*range(spec["save_every"], spec["steps"] + 1, spec["save_every"]), spec["steps"]})
    subdirs = ["checkpoints", "best", "final"] if job == "cmff" else ["checkpoints"]  # CMFF: validation ran
    for subdir in subdirs:
        _assert_complete(two / subdir, saves if subdir == "checkpoints" else [spec["steps"]], set(targets))
        (got, meta), (want, ref_meta) = _restore(two, subdir, targets), _restore(one, subdir, targets)
        assert jax.device_count() == 1 and meta["step"] == ref_meta["step"] == spec["steps"]
        if subdir == "checkpoints":
            assert meta["processes"] == PROCESSES and ref_meta["processes"] == 1
        else:
            assert meta["val"] == pytest.approx(ref_meta["val"], rel=1e-5, abs=1e-6)
        _assert_same_states(f"{job} {subdir}", got, want)
    print(f"{job}: {PROCESSES} processes and the reference in {seconds:.0f} s")
