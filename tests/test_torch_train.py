"""The PyTorch/MONAI peer (experiments/torch_train.py): its budget, its outputs on the raw grid, its skip on a re-run.

torch and MONAI are benchmark dependencies (requirements-bench.txt), not CI's: without them these tests skip.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

import torch

from cmfl_jax.config_variants import load_config
from cmfl_jax.data.dataset import cache_subjects, split_of
from experiments import torch_train


def _raw_brain(subject) -> np.ndarray:
    """The brain from the raw files alone: voxels where any modality is non-zero."""
    return np.any([np.asarray(nib.load(path).dataobj) != 0 for path in subject.images], axis=0)


def _write_split(path, train, validation) -> str:
    with open(path, "w") as f:
        json.dump({"train": [s.subject_id for s in train], "validation": [s.subject_id for s in validation]}, f)
    return str(path)


@pytest.mark.slow
def test_trains_predicts_on_the_raw_grid_and_skips_a_finished_rerun(tmp_path):
    config = load_config("configs/cmff.py:smoke")
    train, validation = split_of(config.data)  # 4 synthetic 48^3 subjects: 3 train, 1 held out
    split = _write_split(tmp_path / "split.json", train, validation)
    out = str(tmp_path / "torch")

    record = torch_train.run(config, split, out, steps=3)
    assert record["steps"] == 3 and len(record["step_s"]) == 3
    assert record["label_set"] == "brats2021" and set(record["predict_s"]) == {validation[0].subject_id}
    path = os.path.join(out, "predictions", f"{validation[0].subject_id}.nii.gz")
    raw, written = nib.load(validation[0].images[0]), nib.load(path)
    assert written.shape == raw.shape == (48, 48, 48)
    np.testing.assert_array_equal(written.affine, raw.affine)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2, 4}

    # The same arguments again: nothing is redone (the prediction is not rewritten); another budget is a new run.
    mtime = os.path.getmtime(path)
    assert torch_train.run(config, split, out, steps=3) == record
    assert os.path.getmtime(path) == mtime
    assert torch_train._finished(out, torch_train.run_key(config, json.load(open(split)), 4, None)) is None

    # A head that always picks class 2 (ED, label 2 in BraTS 2018): 2 exactly in the brain, 0 outside; class 3 (ET) is
    # written as BraTS 2018's 4.
    model = torch_train.build_model(config, 4)
    entries = cache_subjects(config.data, validation)
    brain = _raw_brain(validation[0])
    for chosen, value in ((2, 2), (3, 4)):
        with torch.no_grad():
            model.layers["head"].weight.zero_()
            model.layers["head"].bias.copy_(torch.nn.functional.one_hot(torch.tensor(chosen), 4) * 10.0)
        folder = tmp_path / f"class{chosen}"
        torch_train.predict_subjects(model, config, validation, entries, (0, 1, 2, 4), str(folder))
        label = np.asarray(nib.load(folder / f"{validation[0].subject_id}.nii.gz").dataobj)
        expected = np.zeros(raw.shape, np.uint8)
        expected[brain] = value
        assert 0 < int((expected > 0).sum()) < expected.size  # the brain leaves some of the grid out
        np.testing.assert_array_equal(label, expected)

    # --seconds: the first step boundary past the budget; a budget under one step trains exactly one step.
    train_entries = cache_subjects(config.data, train)
    timed = torch_train.train(torch_train.build_model(config, 4), config, train_entries, (0, 1, 2, 4), seconds=1e-6)
    assert timed["steps"] == 1 and timed["train_s"] >= 1e-6


def test_command_line_takes_variants_overrides_and_one_budget():
    args, config = torch_train.parse_args(["--config", "configs/cmff.py:cpu", "--split", "s.json", "--seconds", "60",
                                           "--out", "o", "--config.data.root=/data/brats",
                                           "--config.train.batch_size=2"])
    assert (args.seconds, args.steps, args.split, args.out) == (60.0, None, "s.json", "o")
    assert config.data.root == "/data/brats" and config.train.batch_size == 2
    assert tuple(config.data.patch_size) == (64, 64, 64) and config.model.base == 8  # the :cpu variant
    with pytest.raises(SystemExit):  # both budgets
        torch_train.parse_args(["--config", "configs/cmff.py:cpu", "--split", "s", "--out", "o", "--steps", "3",
                                "--seconds", "1"])
    with pytest.raises(SystemExit):  # an unknown key
        torch_train.parse_args(["--config", "configs/cmff.py", "--split", "s", "--out", "o", "--steps", "3",
                                "--config.data.nope=1"])
