"""The command line: the prepare job, and bad input as one line on stderr with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cmfl_jax.data.io import read_nifti, write_nifti

from .conftest import REPO, write_tiny_dataset


def console_command() -> list[str]:
    """``cmfl-jax``, the console command of ``pip install -e .`` beside this interpreter. The README's test command
    installs the package, so a missing command is a failure, under CI or not."""
    path = os.path.join(os.path.dirname(sys.executable), "cmfl-jax")
    assert os.path.isfile(path), f"{path} missing: install the package (pip install -e \".[dev]\")"
    return [path]


def run_cli(*args, cache=None, timeout=240, console=False):
    """The CLI in a subprocess (``console``: through the ``cmfl-jax`` command)."""
    env = dict(os.environ, CI="true")
    if cache:
        env["CMFL_JAX_CACHE"] = str(cache)
    command = console_command() if console else [sys.executable, "-m", "cmfl_jax.main"]
    return subprocess.run([*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def cache_files(cache):
    return sorted(os.path.relpath(os.path.join(d, f), cache) for d, _, fs in os.walk(cache) for f in fs)


def test_prepare_prints_summary(tmp_path):
    write_tiny_dataset(tmp_path / "data", n=3)
    r = run_cli("--config=configs/prepare.py", f"--workdir={tmp_path / 'w'}", f"--config.data.root={tmp_path / 'data'}",
                cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "3 subjects in" in r.stdout and "| brats2018 | HGG | 2 | 20x22x24 | 1x1x1 |" in r.stdout
    summary = json.loads((tmp_path / "w" / "prepare_summary.json").read_text())
    total = next(row for row in summary["rows"] if row["layout"] == "all")
    assert total["subjects"] == 3 and total["mean voxels ET"] == 56 and total["with ET"] == 3
    assert len([f for f in cache_files(tmp_path / "cache") if f.endswith("meta.json")]) == 3  # one entry each


def test_missing_modality_exit_2_one_line(tmp_path):
    subjects = write_tiny_dataset(tmp_path / "data", n=2)
    os.remove(subjects[1].images[3])
    r = run_cli("--config=configs/prepare.py", f"--workdir={tmp_path / 'w'}", f"--config.data.root={tmp_path / 'data'}",
                cache=tmp_path / "cache")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] == f"cmfl_jax: error: {os.path.dirname(subjects[1].images[3])}: subject " \
                       f"{subjects[1].subject_id} is missing modality flair"
    assert cache_files(tmp_path / "cache") == []  # discovery fails before anything is cached
    assert not (tmp_path / "w" / "prepare_summary.json").exists()


def test_nan_voxels_exit_2_no_partial_cache(tmp_path):
    subjects = write_tiny_dataset(tmp_path / "data", n=3)
    bad = subjects[2].images[0]
    data, affine, _ = read_nifti(bad)
    data = data.copy()
    data[3, 4, 5] = np.nan
    write_nifti(bad, data, affine)
    args = ("--config=configs/prepare.py", f"--workdir={tmp_path / 'w'}", f"--config.data.root={tmp_path / 'data'}")
    r = run_cli(*args, cache=tmp_path / "cache")
    assert r.returncode == 2
    assert r.stderr.strip() == f"cmfl_jax: error: {bad}: 1 voxel(s) are NaN or Inf"
    left = cache_files(tmp_path / "cache")
    assert not any(".tmp" in f for f in left)  # no half-written entry
    assert not any(subjects[2].subject_id in f for f in left)
    verbose = run_cli(*args, "--verbose", cache=tmp_path / "cache")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_missing_root_and_unknown_job(tmp_path):
    r = run_cli("--config=configs/prepare.py", f"--workdir={tmp_path / 'w'}", f"--config.data.root={tmp_path / 'no'}")
    assert r.returncode == 2 and r.stderr.strip() == f"cmfl_jax: error: {tmp_path / 'no'}: data root does not exist"
    r = run_cli("--config=configs/prepare.py", f"--workdir={tmp_path / 'w'}", "--config.job=nope")
    assert r.returncode == 2 and "config.job: unknown job 'nope'" in r.stderr


def test_cmft_smoke_config_end_to_end(tmp_path):
    """configs/cmft.py:smoke on the built-in data: checkpoint, metrics, previews; CMFF starts from it.

    Resuming through the CLI is tests/test_crash_resume.py's and test_preemption.py's."""
    args = ("--config=configs/cmft.py:smoke", f"--workdir={tmp_path / 'w'}")
    r = run_cli(*args, cache=tmp_path / "cache", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in open(tmp_path / "w" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["3", "6"]
    assert sorted(os.listdir(tmp_path / "w" / "previews")) == ["cmft_0000003.png", "cmft_0000006.png"]
    assert os.listdir(tmp_path / "w" / "tensorboard")
    # Phase 2 from that CMFT run: generators grafted, validation, best/latest/final checkpoints.
    seg = tmp_path / "seg"
    cmff = run_cli("--config=configs/cmff.py:smoke", f"--workdir={seg}", "--config.init.mode=cmft",
                   f"--config.init.cmft_workdir={tmp_path / 'w'}", cache=tmp_path / "cache", timeout=600)
    assert cmff.returncode == 0, cmff.stderr[-2000:]
    assert "init: S_A <- g_ab" in cmff.stdout and "from step 6" not in cmff.stdout
    assert "cmft/checkpoints/6" in cmff.stdout.replace(str(tmp_path / "w"), "cmft")
    records = [json.loads(x) for x in open(seg / "metrics.jsonl")]
    assert [r["step"] for r in records if "val/dice_WT" in r] == [3, 6]
    assert all(0.0 <= r["val/dice_WT"] <= 1.0 for r in records if "val/dice_WT" in r)
    assert sorted(os.listdir(seg / "checkpoints")) == ["3", "6"] and os.listdir(seg / "final") == ["6"]
    assert len(os.listdir(seg / "best")) == 1
    assert sorted(os.listdir(seg / "previews")) == ["cmff_val_0000003.png", "cmff_val_0000006.png"]
    assert json.loads((seg / "config.json").read_text())["init"]["cmft_workdir"] == str(tmp_path / "w")


def test_cmff_without_a_cmft_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "cmft").mkdir()
    r = run_cli("--config=configs/cmff.py:smoke", f"--workdir={tmp_path / 'w'}", "--config.init.mode=cmft",
                f"--config.init.cmft_workdir={tmp_path / 'cmft'}", cache=tmp_path / "cache")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"cmfl_jax: error: {tmp_path / 'cmft' / 'checkpoints'}: no CMFT checkpoint here; train CMFT into this "
        "workdir first (configs/cmft.py)"]
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_missing_console_command_fails_outside_ci_too(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "executable", "/nowhere/bin/python")
    with pytest.raises(AssertionError, match="cmfl-jax missing"):
        console_command()


def test_the_package_needs_no_development_tool():
    """pip install -e . installs pyproject's dependencies only: none is a test, lint or notebook tool, and every
    one of them has its tested version in requirements.txt (the constraints CI installs with)."""
    import re
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert "dependencies" not in project.get("dynamic", [])
    names = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    tools = {"pytest", "pytest-xdist", "ruff", "nbclient", "nbformat", "ipykernel", "jupyter-client"}
    assert not names & tools, names & tools
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain", "nibabel", "ml-collections"} <= names
    with open(os.path.join(REPO, "requirements.txt")) as f:
        pinned = {line.split("==")[0].strip().lower() for line in f if "==" in line.split("#")[0]}
    assert names <= pinned, names - pinned
    extras = project["optional-dependencies"]
    assert {re.split(r"[<>=]", d)[0] for d in extras["dev"]} >= {"pytest", "ruff", "cmfl_jax[notebook]"}
