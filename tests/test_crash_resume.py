"""Crash-exact resume: kill -9 a CMFT and a CMFF smoke run, rerun the same command, get the uninterrupted run.

One trial per phase (each a kill plus a rerun beside one uninterrupted reference run; CI time bounds it):
CMFT is killed at a random step (seeded, so a failure is reproducible) and a half-written later checkpoint
is put beside the last finished one; CMFF is killed while a checkpoint is being written (the test polls
for Orbax's temporary folder and kills the moment it appears). After each, the same command runs again
to the end. The final params must equal the uninterrupted run's within 1e-6; every step's loss must
equal the uninterrupted run's at that step (the same patch was drawn: the data order neither repeats
nor skips); ``metrics.jsonl`` holds each step once; a half-written checkpoint is ignored and removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from .conftest import REPO

STEPS = 8
PHASES = {
    "cmft": ["--config=configs/cmft.py:smoke", "--config.train.preview_every=0"],
    "cmff": ["--config=configs/cmff.py:smoke", "--config.val.every=100"],
}
ITEMS = {"cmft": ("g_ab", "g_ba", "d_a", "d_b"), "cmff": ("seg",)}
TMP_MARK = ".orbax-checkpoint-tmp"


def command(phase, workdir, save_every):
    return [sys.executable, "-m", "cmfl_jax.main", *PHASES[phase], f"--workdir={workdir}",
            f"--config.train.steps={STEPS}", f"--config.train.save_every={save_every}", "--config.train.log_every=1"]


def environment(cache):
    return dict(os.environ, CI="true", CMFL_JAX_CACHE=str(cache))


def run_to_end(phase, workdir, cache, save_every):
    r = subprocess.run(command(phase, workdir, save_every), cwd=REPO, env=environment(cache), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def final_params(phase, workdir):
    path = os.path.join(workdir, "checkpoints", str(STEPS))
    return {item: ocp.StandardCheckpointer().restore(os.path.join(path, item))["params"] for item in ITEMS[phase]}


def losses_by_step(workdir):
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [x["step"] for x in lines if any(k.startswith("train/") for k in x)]
    assert steps == list(range(1, STEPS + 1)), steps  # each step once, none missing
    return {x["step"]: {k: v for k, v in x.items() if k.startswith("train/")} for x in lines
            if any(k.startswith("train/") for k in x)}


def last_finished(workdir) -> int:
    """The newest finished checkpoint step (0: none); Orbax's tmp folders are not finished."""
    ckpt = os.path.join(workdir, "checkpoints")
    return max([int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else [], default=0)


def kill_at_step(phase, workdir, cache, save_every, step):
    """Start the run, SIGKILL it once it logs ``step``; returns the step it was killed after."""
    proc = subprocess.Popen(command(phase, workdir, save_every), cwd=REPO, env=environment(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if f"{phase} step {step}/{STEPS}" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return step


def kill_during_save(phase, workdir, cache):
    """Start the run saving every step, SIGKILL it the moment a temporary checkpoint folder exists.

    Returns the names left under checkpoints/ at the kill (a tmp folder when the kill landed mid-save).
    """
    ckpt = os.path.join(workdir, "checkpoints")
    proc = subprocess.Popen(command(phase, workdir, 1), cwd=REPO, env=environment(cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    seen = []
    while proc.poll() is None and time.monotonic() < deadline:
        names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
        # kill on the second save or later, so a finished checkpoint exists to fall back on
        if any(TMP_MARK in n for n in names) and any(n.isdigit() for n in names):
            proc.send_signal(signal.SIGKILL)
            seen = names
            break
        time.sleep(0.0005)
    proc.wait(timeout=60)
    return seen


def reference_run(phase, base):
    """An uninterrupted run under ``base`` (its compile cache is shared with the trial there)."""
    run_to_end(phase, base / "reference", base / "cache", save_every=2)
    return phase, base, final_params(phase, base / "reference"), losses_by_step(base / "reference")


def assert_same_as_reference(reference, workdir):
    phase, _, params, losses = reference
    resumed = final_params(phase, workdir)
    for item in ITEMS[phase]:
        for a, b in zip(_leaves(resumed[item]), _leaves(params[item]), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=item)
    got = losses_by_step(workdir)
    for step in range(1, STEPS + 1):
        for key, value in losses[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)


def _leaves(tree):
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _leaves(tree[key])
    else:
        yield np.asarray(tree)


def test_cmft_killed_at_a_random_step_resumes_past_a_half_written_checkpoint(tmp_path):
    """The kill leaves the last finished checkpoint; a truncated copy of a later step in Orbax's tmp naming
    (what a kill inside a save leaves) is put beside it and must be ignored and removed."""
    reference = reference_run("cmft", tmp_path)
    phase, base, _, _ = reference
    workdir = base / "killed_at_step"
    step = random.Random(f"{phase}-kill").randint(4, STEPS - 1)
    kill_at_step(phase, workdir, base / "cache", save_every=2, step=step)
    last = last_finished(workdir)
    assert 2 <= last <= step
    half = workdir / "checkpoints" / f"{last + 2}{TMP_MARK}-1764000000"
    shutil.copytree(workdir / "checkpoints" / str(last), half)
    shutil.rmtree(half / ITEMS[phase][0])  # an item never written
    out = run_to_end(phase, workdir, base / "cache", save_every=2)
    assert f"resumed from step {last}" in out
    assert not half.exists()
    assert_same_as_reference(reference, workdir)


def test_cmff_killed_during_a_checkpoint_save_resumes(tmp_path):
    reference = reference_run("cmff", tmp_path)
    phase, base, _, _ = reference
    workdir = base / "killed_in_save"
    left = kill_during_save(phase, workdir, base / "cache")
    print(f"{phase}: at the kill checkpoints/ held {sorted(left)}")  # -s shows whether the save was caught
    finished = last_finished(workdir)
    out = run_to_end(phase, workdir, base / "cache", save_every=1)
    assert f"resumed from step {finished}" in out
    assert not any(TMP_MARK in n for n in os.listdir(workdir / "checkpoints"))
    assert_same_as_reference(reference, workdir)
