"""SIGTERM/SIGINT during training: the current step is saved, the exit status is 0, and a rerun resumes.

One run is stopped by SIGTERM (what a scheduler or a preemptible VM sends), its rerun by SIGINT (Ctrl-C), and
a third run finishes from where the second stopped: both signals, and a resume of a resumed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from .conftest import REPO

STEPS = 500


def stop_with(signum, args, env, after_step):
    """Start the run, send ``signum`` once it logs ``after_step``; the step it says it saved and stopped after."""
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # wait until training runs, then signal
        lines.append(line)
        if f"cmft step {after_step}/{STEPS}" in line:
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    stopped = [line for line in (lines + out.splitlines()) if "stopped after step" in line]
    assert len(stopped) == 1 and f"signal {signum}" in stopped[0], stopped
    return int(stopped[0].split("stopped after step ")[1].split(",")[0]), "".join(lines) + out


def logged_steps(workdir):
    return [json.loads(x)["step"] for x in open(workdir / "metrics.jsonl")]


def test_sigterm_then_sigint_save_the_current_step_exit_zero_and_resume(tmp_path):
    workdir = tmp_path / "w"
    args = [sys.executable, "-m", "cmfl_jax.main", "--config=configs/cmft.py:smoke", f"--workdir={workdir}",
            f"--config.train.steps={STEPS}", "--config.train.save_every=1000", "--config.train.preview_every=0"]
    env = dict(os.environ, CI="true", CMFL_JAX_CACHE=str(tmp_path / "cache"))

    first, _ = stop_with(signal.SIGTERM, args, env, after_step=2)
    assert 2 <= first < STEPS
    assert os.listdir(workdir / "checkpoints") == [str(first)]  # save_every=1000: only the signal saved
    assert logged_steps(workdir) == list(range(1, first + 1))

    second, out = stop_with(signal.SIGINT, args, env, after_step=first + 1)
    assert f"resumed from step {first}" in out
    assert first + 1 <= second < STEPS
    assert sorted(os.listdir(workdir / "checkpoints"), key=int) == [str(first), str(second)]
    assert logged_steps(workdir) == list(range(1, second + 1))

    again = subprocess.run([*args[:-3], f"--config.train.steps={second + 1}", "--config.train.preview_every=0"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from step {second}" in again.stdout
    assert logged_steps(workdir) == list(range(1, second + 2))
