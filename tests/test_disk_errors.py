"""A full disk while writing the cache or a checkpoint: one line naming the file, exit 2, nothing half-written.

A small filesystem is not at hand in CI, so the failing write is simulated in the CLI's own process: the
cache's ``np.save`` raises ENOSPC, or Orbax's save fails with tensorstore's "No space left on device".
"""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import REPO, write_tiny_dataset
from .test_cli import cache_files

DRIVER = """
import errno, runpy, sys
{patch}
sys.argv = ["cmfl_jax.main", *sys.argv[1:]]
runpy.run_module("cmfl_jax.main", run_name="__main__")
"""
FULL_CACHE = """
import numpy as np
def full(path, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
np.save = full
"""
FULL_CHECKPOINT = """
import orbax.checkpoint as ocp
def full(self, step, *a, **k):
    raise ValueError(f"Error writing {self.directory}/{step}: No space left on device [tensorstore]")
ocp.CheckpointManager.save = full
"""


def run_patched(patch, *args, cache):
    env = dict(os.environ, CI="true", CMFL_JAX_CACHE=str(cache))
    return subprocess.run([sys.executable, "-c", DRIVER.format(patch=patch), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_disk_full_while_caching(tmp_path):
    write_tiny_dataset(tmp_path / "data", n=2)
    r = run_patched(FULL_CACHE, "--config=configs/prepare.py", f"--workdir={tmp_path / 'w'}",
                    f"--config.data.root={tmp_path / 'data'}", cache=tmp_path / "cache")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith(f"cmfl_jax: error: {tmp_path / 'cache'}")
    assert "No space left on device (errno ENOSPC)" in lines[0] and "run the same command again" in lines[0]
    assert [f for f in cache_files(tmp_path / "cache") if f.endswith(".npy") or ".tmp" in f] == []
    assert not (tmp_path / "w").exists()


def test_disk_full_while_saving_a_checkpoint(tmp_path):
    workdir = tmp_path / "w"
    r = run_patched(FULL_CHECKPOINT, "--config=configs/cmft.py:smoke",
                    f"--workdir={workdir}", "--config.train.steps=2", "--config.train.save_every=1",
                    "--config.train.preview_every=0", cache=tmp_path / "cache")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{workdir / 'checkpoints'}/1: No space left on device" in lines[0] and "(errno ENOSPC)" in lines[0]
    left = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").exists() else []
    assert not any(n.isdigit() for n in left), left
