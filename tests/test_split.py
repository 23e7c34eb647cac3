"""One split for every phase (``config.data.split``): CMFT never trains on CMFF's validation subjects, the
``split`` job's files, a bad split file, and bounded validation (a subset periodically, the whole fold last)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from cmfl_jax import checkpoints
from cmfl_jax.config_variants import load_config
from cmfl_jax.data.csv_layout import read_subject_csv
from cmfl_jax.data.layouts import discover
from cmfl_jax.data.splits import split_subjects
from cmfl_jax.jobs import cmff as cmff_job
from cmfl_jax.jobs import cmft as cmft_job
from cmfl_jax.jobs import split as split_job
from cmfl_jax.training import loop
from cmfl_jax.training.validation import Validator

from .conftest import write_tiny_dataset
from .test_bad_inputs import assert_one_line_error
from .test_cli import run_cli
from .test_cmff_train import tiny_cmff_config
from .test_cmft import tiny_config as tiny_cmft_config

N = 7  # subjects of the tiny root: 5 folds leave 2 in fold 0 (round-robin over a permutation of 7)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("split_data")
    write_tiny_dataset(root, n=N)
    return root


def ids(subjects) -> list[str]:
    return sorted(s.subject_id for s in subjects)


def write_split_files(root, workdir, **settings) -> dict:
    """The ``split`` job run in-process (as the CLI runs it); returns split.json."""
    config = load_config("split")
    config.data.root = str(root)
    for key, value in settings.items():
        config.data.split[key] = value
    split_job.run(config, str(workdir))
    return json.loads((workdir / "split.json").read_text())


def cmft_training_subjects(config, workdir, monkeypatch) -> list[str]:
    """Run the real cmft job (1 step); the ids of the entries its patch stream was built from."""
    seen = []
    real = loop.patch_dataset

    def recording(entries, *args, **kwargs):
        seen.extend(e.subject_id for e in entries)
        return real(entries, *args, **kwargs)

    monkeypatch.setattr(loop, "patch_dataset", recording)
    cmft_job.train(config, str(workdir))
    assert checkpoints.latest_step(str(workdir)) == config.train.steps  # it trained
    return sorted(seen)


def cmff_validation_subjects(config) -> list[str]:
    """The ids the cmff job validates on for ``config`` (its own data path, no training)."""
    return ids(cmff_job._data(config)[1])


def test_cmft_then_cmff_on_one_root_never_trains_cmft_on_a_validation_subject(root, tmp_path, monkeypatch, caplog):
    cmft = tiny_cmft_config(root, steps=1)
    cmff = tiny_cmff_config(root)
    cmff.data.split = cmft.data.split  # the manual route: each job's own config, the same data.split
    validation = cmff_validation_subjects(cmff)
    assert validation  # there is a fold to leak
    with caplog.at_level(logging.INFO):
        trained = cmft_training_subjects(cmft, tmp_path / "cmft", monkeypatch)
    assert not set(trained) & set(validation)
    assert sorted(set(trained) | set(validation)) == ids(discover(root))  # every other subject trains CMFT
    assert (f"cmft: {len(set(trained))} training subjects, {len(validation)} held out for CMFF validation "
            "(data.split)") in caplog.text


def test_the_default_configs_share_one_split():
    from cmfl_jax.config_variants import load_config

    for variant in ("", "smoke", "cpu", "full"):
        cmft, cmff = load_config(f"cmft:{variant}"), load_config(f"cmff:{variant}")
        assert cmft.data.split.to_dict() == cmff.data.split.to_dict()
    assert "folds" not in load_config("cmff").val and "seed" not in load_config("cmff").val


def test_cmft_and_cmff_with_a_split_file_use_exactly_its_ids(root, tmp_path, monkeypatch):
    record = write_split_files(root, tmp_path / "split", folds=3, fold=1, seed=5)
    cmft = tiny_cmft_config(root, steps=1)
    cmft.data.split.file = str(tmp_path / "split" / "split.json")
    own = split_subjects(discover(root), cmft.data.split.folds, cmft.data.split.fold, cmft.data.split.seed)
    assert ids(own[0]) != record["train"]  # the file, not folds/fold/seed, must decide
    trained = cmft_training_subjects(cmft, tmp_path / "cmft", monkeypatch)
    assert sorted(set(trained)) == record["train"]
    cmff = tiny_cmff_config(root)
    cmff.data.split.file = cmft.data.split.file
    train, validation = cmff_job._data(cmff)
    assert ids(train) == record["train"] and ids(validation) == record["validation"]


def test_split_job_writes_the_split_of_split_subjects_and_cmff_validates_on_it(root, tmp_path, monkeypatch):
    work = tmp_path / "w"
    r = run_cli("--config=configs/split.py", f"--workdir={work}", f"--config.data.root={root}",
                "--config.data.split.folds=3", "--config.data.split.fold=2", "--config.data.split.seed=4",
                cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((work / "split.json").read_text())
    train, validation = split_subjects(discover(root), 3, 2, 4)
    assert record == {"root": str(root), "folds": 3, "fold": 2, "seed": 4, "train": ids(train),
                      "validation": ids(validation)}
    assert ids(read_subject_csv(str(work / "train.csv"), True)) == ids(train)
    assert ids(read_subject_csv(str(work / "validation.csv"), True)) == ids(validation)
    assert f"{len(train)} training and {len(validation)} validation subjects" in r.stdout
    assert sorted(os.listdir(work)) == ["config.json", "split.json", "train.csv", "validation.csv"]

    # CMFF with that file (and other folds in its config) trains and validates on exactly those ids.
    config = tiny_cmff_config(root, steps=1, **{"val.every": 1})
    assert ids(cmff_job._data(config)[1]) != ids(validation)  # without the file it would validate on others
    config.data.split.file = str(work / "split.json")
    validated, trained = [], []
    real_evaluate, real_patches = Validator.evaluate, loop.patch_dataset

    def evaluate(self, params, entries, step=None):
        validated.append([e.subject_id for e in entries])
        return real_evaluate(self, params, entries, step)

    def patches(entries, *args, **kwargs):
        trained.extend(e.subject_id for e in entries)
        return real_patches(entries, *args, **kwargs)

    monkeypatch.setattr(Validator, "evaluate", evaluate)
    monkeypatch.setattr(loop, "patch_dataset", patches)
    cmff_job.train(config, str(tmp_path / "cmff"))
    assert validated == [ids(validation)] and sorted(trained) == ids(train)


def _bad_files(root, folder) -> dict[str, tuple[str, str]]:
    """name -> (file content, the problem its one-line error must name)."""
    good = write_split_files(root, folder / "good")
    return {
        "not-json": ("{train: [", "cannot read the split file"),
        "no-validation": (json.dumps({"train": good["train"]}), "'validation' must be a list of subject ids"),
        "unknown-id": (json.dumps({**good, "validation": ["Brats18_NOPE"]}),
                       "subject Brats18_NOPE of 'validation' (1 of its 1 ids) is not in the data root"),
        "in-both": (json.dumps({**good, "validation": good["train"][:1]}), "is in both 'train' and 'validation'"),
    }


@pytest.mark.parametrize("case", ["not-json", "no-validation", "unknown-id", "in-both"])
def test_a_bad_split_file_is_one_line_naming_it(root, tmp_path, case):
    content, problem = _bad_files(root, tmp_path)[case]
    bad = tmp_path / "split.json"
    bad.write_text(content)
    r = run_cli("--config=configs/cmft.py:smoke", f"--workdir={tmp_path / 'w'}", f"--config.data.root={root}",
                f"--config.data.split.file={bad}", cache=tmp_path / "cache")
    assert_one_line_error(r, bad, problem)
    assert not (tmp_path / "w").exists()


def test_periodic_validation_sees_the_subset_and_the_last_step_the_whole_fold(root, tmp_path, monkeypatch):
    config = tiny_cmff_config(root, steps=2, **{"val.every": 1, "val.max_subjects": 1})
    config.data.split.folds = 2  # fold 0 holds 4 of the 7 subjects
    fold = cmff_validation_subjects(config)
    assert len(fold) > 1
    validated = []
    real = Validator.evaluate

    def evaluate(self, params, entries, step=None):
        validated.append([e.subject_id for e in entries])
        return real(self, params, entries, step)

    monkeypatch.setattr(Validator, "evaluate", evaluate)
    work = tmp_path / "cmff"
    cmff_job.train(config, str(work))
    assert validated == [fold[:1], fold]  # step 1: the first id in sorted order; step 2 (the last): all
    records = [json.loads(x) for x in open(work / "metrics.jsonl") if "val/subjects" in x]
    assert [(r["step"], r["val/subjects"], r.get("val/full/subjects")) for r in records] == [
        (1, 1, None), (2, 1, len(fold))]
    assert all(r["val/seconds"] > 0 for r in records)
    # best/ is chosen among subset scores (the last step's too); final/ keeps the whole fold's metrics
    best = checkpoints.latest_meta(str(work), "best")
    assert best["val"]["subjects"] == 1
    assert best["val"]["dice_mean"] == pytest.approx(max(r["val/dice_mean"] for r in records))
    final = checkpoints.latest_meta(str(work), "final")
    assert final["val"]["subjects"] == len(fold)
    assert final["val"]["dice_mean"] == pytest.approx(records[-1]["val/full/dice_mean"])

    validated.clear()
    config.val.full_at_end = False
    config.train.fresh = True
    cmff_job.train(config, str(work))
    assert validated == [fold[:1], fold[:1]]
