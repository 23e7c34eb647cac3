"""SIGTERM/SIGINT during training: the current step is saved, the exit status is 0, and a rerun resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_current_step_and_exits_zero(tmp_path, signum):
    workdir = tmp_path / "w"
    args = [sys.executable, "-m", "cmfl_jax.main", "--config=configs/cmft.py:smoke", f"--workdir={workdir}",
            "--config.train.steps=500", "--config.train.save_every=1000", "--config.train.preview_every=0"]
    env = dict(os.environ, CI="true", CMFL_JAX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # wait until training runs, then signal
        lines.append(line)
        if "cmft step 2/500" in line:
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    stopped = [line for line in (lines + out.splitlines()) if "stopped after step" in line]
    assert len(stopped) == 1
    step = int(stopped[0].split("stopped after step ")[1].split(",")[0])
    assert 2 <= step < 500
    assert os.listdir(workdir / "checkpoints") == [str(step)]
    logged = [json.loads(x)["step"] for x in open(workdir / "metrics.jsonl")]
    assert logged == list(range(1, step + 1))
    again = subprocess.run([*args[:-3], f"--config.train.steps={step + 1}", "--config.train.preview_every=0"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from step {step}" in again.stdout
    assert [json.loads(x)["step"] for x in open(workdir / "metrics.jsonl")] == list(range(1, step + 2))
