"""configs/cv.py:smoke through the command line: per-fold splits that keep each fold's CMFT and CMFF off its
held-out subjects, a checkpoint and threshold chosen on other subjects, out-of-fold scores, the summary, a re-run
that skips finished folds, and the fold ensemble predicting from the CV workdir."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from cmfl_jax import checkpoints
from cmfl_jax.config_variants import load_config
from cmfl_jax.data.io import load_subject
from cmfl_jax.data.layouts import discover
from cmfl_jax.data.preprocess import preprocess_images
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.ensemble import model_dirs
from cmfl_jax.inference.predictor import Predictor
from cmfl_jax.inference.sliding_window import restrict_to_brain
from cmfl_jax.jobs import predict
from cmfl_jax.label_classes import classes_to_labels
from cmfl_jax.training.cross_validation import summarize

from .test_cli import REPO, run_cli

FOLDS = 2


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    work, cache = tmp / "cv", tmp / "cache"
    # the CLI with a record of the subjects that reach CMFF's validation (selection) and the out-of-fold scoring
    env = dict(os.environ, CI="true", CMFL_JAX_CACHE=str(cache))
    r = subprocess.run([sys.executable, "-m", "tests.selection_spy", str(tmp / "spy.json"),
                        "--config=configs/cv.py:smoke", f"--workdir={work}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    assert r.returncode == 0, r.stderr[-3000:]
    return work, cache, r, read(tmp / "spy.json")


def read(path) -> dict:
    return json.loads(open(path).read())


def fold_outputs(work) -> dict[str, int]:
    """mtime of every file of the folds (splits, checkpoints, markers, scores)."""
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(work) if "fold" in d for f in files}


def test_the_scored_subjects_never_reach_the_selection(cv_run):
    """The subjects CMFF's validation received (it picks best/ and tunes the ET threshold) and those the out-of-fold
    scoring received, as recorded by tests/selection_spy.py: disjoint in every fold, each non-empty."""
    work, _, _, spy = cv_run
    for k in range(FOLDS):
        fold = work / f"fold{k}"
        held_out = set(read(fold / "split.json")["validation"])
        selected = set(spy["selected"][str(fold / "cmff")])
        scored = set(spy["scored"][str(fold / "cmff")])
        assert scored == held_out and selected == set(read(fold / "select" / "split.json")["validation"])
        assert selected and not selected & scored
        record = read(fold / "validation.json")
        tuned = checkpoints.latest_meta(str(fold / "cmff"), "best")["postprocess"]["et_min_mm3"]
        assert record["checkpoint"] == "best" and record["et_min_mm3"] == tuned  # the selection's threshold


def test_cv_smoke_folds_summary_and_resume(cv_run):
    work, cache, r, _ = cv_run
    assert r.stderr == ""
    assert (work / "cv_summary.md").read_text() in r.stdout  # the one summary, printed and written
    validation, subjects = [], None
    for k in range(FOLDS):
        fold = work / f"fold{k}"
        split = read(fold / "split.json")
        assert split["fold"] == k and split["folds"] == FOLDS
        inner = read(fold / "select" / "split.json")  # fold k's training subjects, split to train and select
        assert sorted(inner["train"] + inner["validation"]) == split["train"] and inner["validation"]
        for stage in ("cmft", "cmff"):  # both stages read the inner split: neither sees fold k's held-out subjects
            stage_split = read(fold / stage / "config.json")["data"]["split"]["file"]
            assert stage_split == str(fold / "select" / "split.json")
        validation.append(set(split["validation"]))
        everyone = set(split["train"]) | set(split["validation"])
        assert subjects in (None, everyone)
        subjects = everyone
        scores = read(fold / "validation.json")
        assert sorted(s["subject_id"] for s in scores["subjects"]) == split["validation"]
        assert scores["metrics"]["subjects"] == len(split["validation"])
    assert set().union(*validation) == subjects and sum(map(len, validation)) == len(subjects) == 4  # a partition

    summary = read(work / "cv_summary.json")
    per_fold = [read(work / f"fold{k}" / "validation.json")["metrics"] for k in range(FOLDS)]
    assert summary["per_fold"] == per_fold and summary["models"] == [f"fold{k}/cmff" for k in range(FOLDS)]
    for region in ("ET", "WT", "TC"):
        for metric in ("dice", "hd95"):
            values = [f[f"{metric}_{region}"] for f in per_fold]
            assert summary["mean"][f"{metric}_{region}"] == pytest.approx(np.mean(values), abs=1e-12)
            assert summary["std"][f"{metric}_{region}"] == pytest.approx(np.std(values), abs=1e-12)
    thresholds = [read(work / f"fold{k}" / "validation.json")["et_min_mm3"] for k in range(FOLDS)]
    assert summary["postprocess"] == {"et_min_mm3": (thresholds[0] + thresholds[1]) / 2}  # the median of two
    md = (work / "cv_summary.md").read_text()
    assert f"| mean ± std | 4 | {summary['mean']['dice_ET']:.4f} ± {summary['std']['dice_ET']:.4f} |" in md
    post = summary["postprocessed"]["mean"]
    assert f"| mean ± std | 4 | {post['dice_ET']:.4f} ± {summary['postprocessed']['std']['dice_ET']:.4f} |" in md
    assert f"--config.model_dir={work}" in md

    before = fold_outputs(work)
    again = run_cli("--config=configs/cv.py:smoke", f"--workdir={work}", cache=cache, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    for k in range(FOLDS):
        assert f"cv: fold {k} finished before with this config, reused" in again.stdout
    assert "stage cmft" not in again.stdout and fold_outputs(work) == before  # nothing of a fold redone
    assert read(work / "cv_summary.json") == summary


def predict_probabilities(model_dir: str, root: str, out) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{subject: (written labels, saved probabilities)}`` of ``predict`` with ``model_dir``, post-processing off."""
    config = load_config("predict")
    config.model_dir, config.data.root = model_dir, root
    config.save_probabilities, config.postprocess.et_min_mm3 = True, 0.0
    predict.run(config, str(out))
    folder = out / "predictions"
    names = sorted(f[: -len("_probabilities.nii.gz")] for f in os.listdir(folder) if "_probabilities" in f)
    return {n: (np.asarray(nib.load(folder / f"{n}.nii.gz").dataobj),
                np.asarray(nib.load(folder / f"{n}_probabilities.nii.gz").dataobj)) for n in names}


def test_the_ensemble_is_the_mean_of_the_models_probabilities(tmp_path, cv_run):
    """Two fold models (different data, different params): the ensemble's saved probabilities are the mean of
    each model's own, and its labels come from that mean; one model alone is the plain predictor."""
    work, _, _, _ = cv_run
    a, b = (str(work / f"fold{k}" / "cmff") for k in range(FOLDS))
    root = str(work / "fold0" / "validation.csv")
    first, second = predict_probabilities(a, root, tmp_path / "a"), predict_probabilities(b, root, tmp_path / "b")
    both = predict_probabilities(f"{a},{b}", root, tmp_path / "ab")
    subjects = discover(root, require_labels=False)
    assert set(both) == set(first) == set(second) == {s.subject_id for s in subjects}
    for subject in subjects:
        labels, probs = both[subject.subject_id]
        one, two = first[subject.subject_id][1], second[subject.subject_id][1]
        assert one.shape[-1] == 4 and not np.allclose(one, two, atol=1e-4)  # the models differ
        mean = (one + two) / np.float32(2)
        np.testing.assert_allclose(probs, mean, rtol=1e-6, atol=1e-7)
        image = np.moveaxis(preprocess_images(load_subject(subject, with_label=False).images), 0, -1)
        np.testing.assert_array_equal(labels, restrict_to_brain(classes_to_labels(mean.argmax(-1)), image))
    config = load_config("predict")
    assert model_dirs(a) == ([a], None) and type(predict._load_predictor(config, [a])) is Predictor


def test_models_trained_on_other_inputs_are_one_line(tmp_path, cv_run):
    work, _, _, _ = cv_run
    other = tmp_path / "other"
    shutil.copytree(work / "fold1" / "cmff", other)  # as if trained without z-scoring: its config.json says so
    run_config = json.loads((other / "config.json").read_text())
    run_config["data"]["normalization"] = "none"
    (other / "config.json").write_text(json.dumps(run_config))
    config = load_config("predict")
    config.model_dir = f"{work / 'fold0' / 'cmff'},{other}"
    config.data.root = str(work / "fold0" / "validation.csv")
    with pytest.raises(CMFLError, match=r"^config\.model_dir: the models disagree on normalization "
                                        r"\(zscore_brain, none\)"):
        predict.run(config, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "predictions").exists()


def test_predict_with_the_cv_workdir_is_the_fold_ensemble(tmp_path, cv_run, caplog):
    work, _, _, _ = cv_run
    config = load_config("predict")
    config.model_dir, config.data.root = str(work), str(work / "fold0" / "validation.csv")
    caplog.set_level(logging.INFO, logger="absl")
    predict.run(config, str(tmp_path / "out"))
    assert "predict: an ensemble of 2 models" in caplog.text
    for k in range(FOLDS):
        assert os.path.join(str(work), f"fold{k}", "cmff", "best") in caplog.text
    threshold = read(work / "cv_summary.json")["postprocess"]["et_min_mm3"]
    assert f"under {threshold:g} mm³ becomes NCR/NET" in caplog.text
    assert "the median of the CV run's folds' own thresholds" in caplog.text
    assert sorted(os.listdir(tmp_path / "out" / "predictions")) == sorted(
        f"{i}.nii.gz" for i in read(work / "fold0" / "split.json")["validation"])


def test_summary_is_mean_and_population_std_over_folds():
    out = summarize([{"dice_ET": 0.2, "subjects": 3}, {"dice_ET": 0.6, "subjects": 1}])
    assert out["mean"] == {"dice_ET": pytest.approx(0.4)} and out["std"] == {"dice_ET": pytest.approx(0.2)}
