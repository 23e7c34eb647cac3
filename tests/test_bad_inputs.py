"""The bad-input catalogue: every case through the CLI in a subprocess.

Each must exit with status 2, print exactly one line on stderr that names the file or config key
and the problem, show no traceback, and leave no output behind: no workdir (or an unchanged one),
no half-written cache entry, no new checkpoint.
"""

from __future__ import annotations

import gzip
import os

import jax
import nibabel as nib
import numpy as np
import pytest

from cmfl_jax import checkpoints
from cmfl_jax.data.io import read_nifti, write_nifti
from cmfl_jax.training.cmff_step import create_state

from .conftest import write_tiny_dataset
from .test_cli import cache_files, run_cli
from .test_cmff_train import tiny_cmff_config, tiny_cmft_config, write_cmft_checkpoint


def rewrite(path, change):
    """Replace the volume at ``path`` by ``change(data)`` (same affine)."""
    data, affine, _ = read_nifti(path)
    write_nifti(path, change(np.array(data)), affine)


def set_voxel(value):
    def change(data):
        data[3, 4, 5] = value
        return data
    return change


# --- data cases, run through the prepare job: (setup(subject) -> where, expected problem) -------------------

def missing_modality(s):
    os.remove(s.images[3])
    return os.path.dirname(s.images[3]), f"subject {s.subject_id} is missing modality flair"


def truncated(s):
    raw = open(s.images[1], "rb").read()
    open(s.images[1], "wb").write(raw[: len(raw) // 2])
    return s.images[1], "unreadable or truncated NIfTI"


def four_d(s):
    rewrite(s.images[2], lambda d: np.stack([d, d], axis=-1))
    return s.images[2], "expected a 3D volume, got shape (20, 22, 24, 2)"


def two_d(s):
    rewrite(s.images[0], lambda d: d[:, :, 0])
    return s.images[0], "expected a 3D volume, got shape (20, 22)"


def shape_mismatch(s):
    rewrite(s.images[2], lambda d: d[:, :, :20])
    return s.images[2], "shape (20, 22, 20) differs from (20, 22, 24) of"


def affine_mismatch(s):
    data, affine, _ = read_nifti(s.images[3])
    affine = affine.copy()
    affine[0, 3] += 5.0
    write_nifti(s.images[3], np.array(data), affine)
    return s.images[3], "affine differs from"


def nan_voxel(s):
    rewrite(s.images[0], set_voxel(np.nan))
    return s.images[0], "1 voxel(s) are NaN or Inf"


def inf_voxel(s):
    rewrite(s.images[1], set_voxel(np.inf))
    return s.images[1], "1 voxel(s) are NaN or Inf"


def all_zero(s):
    rewrite(s.images[2], np.zeros_like)
    return s.images[2], "modality t2 is all zero"


def label_outside_convention(s):
    rewrite(s.label, set_voxel(3))
    return s.label, "label values [3] outside brats2021 (0/1/2/4)"


def gzip_garbage(s):
    with gzip.open(s.images[0], "wb") as f:
        f.write(b"not a nifti header" * 20)
    return s.images[0], "unreadable or truncated NIfTI"


DATA_CASES = [missing_modality, truncated, four_d, two_d, shape_mismatch, affine_mismatch, nan_voxel, inf_voxel,
              all_zero, label_outside_convention, gzip_garbage]


def assert_one_line_error(result, where, problem):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"cmfl_jax: error: {where}: "), lines[0]
    assert problem in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", DATA_CASES, ids=lambda c: c.__name__)
def test_bad_data_file(tmp_path, case):
    subjects = write_tiny_dataset(tmp_path / "data", n=2)
    bad = subjects[1]
    where, problem = case(bad)
    workdir, cache = tmp_path / "w", tmp_path / "cache"
    r = run_cli("--config=configs/prepare.py", f"--workdir={workdir}", f"--config.data.root={tmp_path / 'data'}",
                cache=cache)
    assert_one_line_error(r, where, problem)
    assert not workdir.exists()
    left = cache_files(cache) if cache.exists() else []
    assert not any(".tmp" in f or bad.subject_id in f for f in left), left


@pytest.mark.parametrize("root, problem", [("missing", "data root does not exist"),
                                           ("empty", "no subjects found: expected BraTS file names")])
def test_missing_or_empty_data_root(tmp_path, root, problem):
    (tmp_path / "empty").mkdir()
    r = run_cli("--config=configs/cmft.py:smoke", f"--workdir={tmp_path / 'w'}",
                f"--config.data.root={tmp_path / root}")
    assert_one_line_error(r, tmp_path / root, problem)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args, where, problem", [
    (["--config=configs/cmft.py:smoke", "--config.data.nope=1"], "config.data.nope", "unknown config key"),
    (["--config=configs/cmft.py:smoke", "--config.nope.deeper=1"], "config.nope.deeper", "unknown config key"),
    (["--config=configs/cmft.py:smoke", "--config.train.steps=abc"], "--config.train.steps=abc",
     "invalid literal for int()"),
    (["--config=configs/cmff.py:smoke", "--config.cmff.lr=fast"], "--config.cmff.lr=fast", "could not convert"),
    (["--config=configs/cmft.py:smoke", "--config.data.patch_size=(32,32)"], "config.data.patch_size",
     "must be 3 positive integers, got (32, 32)"),
    (["--config=configs/cmft.py:bogus"], "--config=configs/cmft.py", "unknown variant 'bogus'"),
    (["--config=configs/nope.py"], "configs/nope.py", "cannot load config file"),
    (["--config=configs/cmft.py:smoke", "--config.job=nope"], "config.job", "unknown job 'nope'"),
    (["--config=configs/cmff.py:smoke", "--config.model.branches=C"], "config.model.branches", "unknown value 'C'"),
    (["--config=configs/cmft.py:smoke", "--config.data.pairing=t1-t2"], "config.data.pairing",
     "unknown pairing 't1-t2'"),
], ids=["unknown-key", "unknown-section", "int-type", "float-type", "patch-length", "variant", "config-file", "job",
        "branches", "pairing"])
def test_bad_config(tmp_path, args, where, problem):
    write_tiny_dataset(tmp_path / "data", n=3)
    r = run_cli(*args, f"--workdir={tmp_path / 'w'}", f"--config.data.root={tmp_path / 'data'}")
    assert_one_line_error(r, where, problem)
    assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input_data")
    write_tiny_dataset(root, n=3)
    return root


def cmff_smoke_args(root, workdir, *extra):
    """configs/cmff.py:smoke at the sizes of tests/test_cmff_train.py's tiny config (base 2)."""
    return ("--config=configs/cmff.py:smoke", f"--workdir={workdir}", f"--config.data.root={root}",
            "--config.data.patch_size=(16,16,16)", "--config.model.base=2", "--config.model.conv_impl=native",
            "--config.data.split.folds=3", *extra)


def test_resume_from_a_checkpoint_of_another_architecture(tmp_path, tiny_data):
    workdir = tmp_path / "cmff"
    config = tiny_cmff_config(tiny_data, **{"init.mode": "random", "model.base": 4})  # saved: base 4
    manager = checkpoints.make_manager(str(workdir))
    checkpoints.save(manager, 3, {"seg": create_state(jax.random.key(0), config)}, {"step": 3}, force=True)
    checkpoints.close(manager)
    before = sorted(os.listdir(workdir / "checkpoints"))
    r = run_cli(*cmff_smoke_args(tiny_data, workdir, "--config.init.mode=random"))  # asks for base 2
    assert_one_line_error(r, workdir / "checkpoints" / "3" / "seg", "in the checkpoint but")
    assert sorted(os.listdir(workdir / "checkpoints")) == before
    assert not (workdir / "config.json").exists() and not (workdir / "final").exists()


def test_cmff_from_a_cmft_run_of_another_depth(tmp_path, tiny_data):
    cmft = tmp_path / "cmft"
    write_cmft_checkpoint(cmft, tiny_cmft_config(tiny_data, **{"model.depth": 3}), step=5)
    (cmft / "config.json").unlink()  # let the parameter check (not the config check) find it
    r = run_cli(*cmff_smoke_args(tiny_data, tmp_path / "cmff", f"--config.init.cmft_workdir={cmft}",
                                 "--config.init.mode=cmft"))
    assert_one_line_error(r, cmft / "checkpoints" / "5" / "g_ab", "")
    assert "checkpoint has no parameter" in r.stderr or "has shape" in r.stderr
    assert not (tmp_path / "cmff").exists()


@pytest.mark.parametrize("state", ["empty", "missing"])
def test_cmff_pointed_at_a_cmft_workdir_without_checkpoint(tmp_path, tiny_data, state):
    cmft = tmp_path / "cmft"
    if state == "empty":
        (cmft / "checkpoints").mkdir(parents=True)
    r = run_cli(*cmff_smoke_args(tiny_data, tmp_path / "cmff", f"--config.init.cmft_workdir={cmft}",
                                 "--config.init.mode=cmft"))
    where, problem = {"empty": (cmft / "checkpoints", "no CMFT checkpoint here"),
                      "missing": (cmft, "CMFT workdir (config.init.cmft_workdir) does not exist")}[state]
    assert_one_line_error(r, where, problem)
    assert not (tmp_path / "cmff").exists()


def test_predict_on_a_folder_without_subjects(tmp_path, tiny_data):
    model_dir = tmp_path / "cmff"
    config = tiny_cmff_config(tiny_data, **{"init.mode": "random"})
    manager = checkpoints.make_manager(str(model_dir), subdir="best")
    checkpoints.save(manager, 2, {"seg": create_state(jax.random.key(0), config)}, {"step": 2, "val": {}}, force=True)
    checkpoints.close(manager)
    (model_dir / "config.json").write_text(config.to_json_best_effort())
    empty = tmp_path / "nothing_here"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "readme.txt").write_text("no images")
    r = run_cli("--config=configs/predict.py", f"--workdir={tmp_path / 'p'}", f"--config.model_dir={model_dir}",
                f"--config.data.root={empty}")
    assert_one_line_error(r, empty, "no subjects found")
    assert not (tmp_path / "p").exists()


def test_predict_with_a_model_dir_that_is_not_a_run(tmp_path, tiny_data):
    (tmp_path / "not_a_run").mkdir()
    r = run_cli("--config=configs/predict.py", f"--workdir={tmp_path / 'p'}",
                f"--config.model_dir={tmp_path / 'not_a_run'}", f"--config.data.root={tiny_data}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert str(tmp_path / "not_a_run") in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p").exists()


def test_evaluate_with_predictions_missing(tmp_path, tiny_data):
    (tmp_path / "preds").mkdir()
    r = run_cli("--config=configs/evaluate.py", f"--workdir={tmp_path / 'e'}", f"--config.data.root={tiny_data}",
                f"--config.predictions={tmp_path / 'preds'}")
    assert_one_line_error(r, tmp_path / "preds" / "Brats18_SYN_0000_1.nii.gz",
                          "prediction not found (3 of 3 subjects have none)")
    assert not (tmp_path / "e").exists()


def test_verbose_shows_the_traceback(tmp_path):
    r = run_cli("--config=configs/cmft.py:smoke", f"--workdir={tmp_path / 'w'}", "--config.data.nope=1", "--verbose")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_nifti_helpers_write_what_the_cases_expect(tmp_path):
    """The catalogue's own tools: a 4D rewrite really is 4D on disk (the case tests the reader, not the writer)."""
    subjects = write_tiny_dataset(tmp_path, n=1)
    four_d(subjects[0])
    assert nib.load(subjects[0].images[2]).shape == (20, 22, 24, 2)
