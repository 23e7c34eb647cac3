"""The ``cv`` job (``configs/cv.py``): k-fold cross-validation of CMFT -> CMFF, scored out of fold, one summary.

For each fold k of ``config.data.split.folds``: the split of fold k is written into ``<workdir>/fold<k>/`` as the
``split`` job writes it (what is held out and scored). Nothing is chosen on those subjects: fold k's training subjects
are split again (``config.oof.inner_folds``) into ``<workdir>/fold<k>/select/``, and CMFT and CMFF run on that
split as the demo runs them (:mod:`cmfl_jax.stage_runner`), so CMFF's validation, which picks ``best/`` and tunes the
ET threshold, sees only training subjects of fold k. ``inner_folds`` <= 1: CMFF trains on all of them without
validation, and ``final/`` is scored. Then that model predicts the held-out subjects, and
``fold<k>/validation.json`` keeps their metrics as predicted and post-processed as ``config.oof`` says (by default
with the fold's own tuned threshold; the labels in ``fold<k>/predictions/``), by
:mod:`cmfl_jax.training.cross_validation`. ``validation.json`` is written last: a fold with one whose config and split
are this run's is skipped on a re-run. The end: ``cv_summary.json`` and ``cv_summary.md`` (per-fold and mean ± std,
the ensemble's threshold: the median of the folds' own, and its predict command).
"""

from __future__ import annotations

import copy
import json
import os
import time

import ml_collections
import numpy as np
from absl import logging

from cmfl_jax.data import splits
from cmfl_jax.data.dataset import resolve_root, split_of
from cmfl_jax.data.io import read_json
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.ensemble import CV_SUMMARY, fold_dir
from cmfl_jax.run_log import format_seconds
from cmfl_jax.stage_runner import run_stages, training_stages, write_text
from cmfl_jax.training import cross_validation as cv

STAGES = ("cmft", "cmff")
MARKER = "cv_stage.json"  # in each stage's folder: the config and split of its last finished run
FOLD_FILE = "validation.json"  # in each fold's folder, written last: the fold's out-of-fold scores
SELECT_DIR = "select"  # in each fold's folder: the split of its training subjects that the stages train and select on


def _folds(config: ml_collections.ConfigDict) -> int:
    if config.data.split.file:
        raise CMFLError("config.data.split.file", "must be empty: cross-validation writes one split per fold of "
                                                  "config.data.split.folds")
    folds = int(config.data.split.folds)
    if folds < 2:
        raise CMFLError("config.data.split.folds", f"must be at least 2 for cross-validation, got {folds}")
    return folds


def fold_split(config: ml_collections.ConfigDict, k: int) -> tuple[ml_collections.ConfigDict, list, list]:
    """(the data config of fold k, its training subjects, its held-out subjects)."""
    data = copy.deepcopy(config.data)
    data.split.fold = k
    train, held_out = split_of(data)
    return data, train, held_out


def inner_split(config: ml_collections.ConfigDict, train: list) -> tuple[list, list]:
    """(what CMFF trains on, what it selects on): fold 0 of ``config.oof.inner_folds`` of a fold's training subjects
    (by the split's seed); ``inner_folds`` <= 1: all of them, and no selection subject."""
    folds = int(config.oof.inner_folds)
    if folds > 1 and len(train) < 2:
        raise CMFLError("config.oof.inner_folds", f"a fold's {len(train)} training subject(s) cannot be split to "
                                                  "select on; set it to 0 (score final/, no selection)")
    return splits.split_subjects(train, folds, 0, int(config.data.split.seed))


def run_fold(config: ml_collections.ConfigDict, workdir: str, k: int, root: str) -> dict | None:
    """Fold k's ``validation.json`` record (reused when finished with this config and split); None if stopped."""
    folder = fold_dir(workdir, k)
    data, train, held_out = fold_split(config, k)
    fit, select = inner_split(config, train)
    split = json.dumps({part: sorted(s.subject_id for s in subjects) for part, subjects in
                        (("train", train), ("validation", held_out), ("select", select))}, sort_keys=True)
    select_dir = os.path.join(folder, SELECT_DIR)
    fold_config = copy.deepcopy(config)
    fold_config.data = data
    stages = training_stages(fold_config, os.path.join(select_dir, splits.SPLIT_FILE), os.path.join(folder, "cmft"))
    checkpoint = "best" if select else "final"
    key = json.dumps({name: json.loads(stages[name].to_json_best_effort()) for name in STAGES}
                     | {"oof": config.oof.to_dict(), "checkpoint": checkpoint}, sort_keys=True)
    record = read_json(os.path.join(folder, FOLD_FILE))
    if record is not None and record.get("config") == key and record.get("split") == split:
        logging.info("cv: fold %d finished before with this config, reused (%s)", k, folder)
        return record
    splits.write_split(folder, root, splits.split_settings(data.split), train, held_out)
    splits.write_split(select_dir, root, {"folds": int(config.oof.inner_folds), "fold": 0,
                                          "seed": int(data.split.seed)}, fit, select)
    logging.info("cv: fold %d: %d held-out subjects; of its %d training subjects %d train and %d select the "
                 "checkpoint and the ET threshold (%s)", k, len(held_out), len(train), len(fit), len(select),
                 select_dir)
    start = time.perf_counter()
    report = run_stages(stages, folder, split, STAGES, MARKER, f"cv fold {k}")
    if report is None:
        return None
    cmff_dir = os.path.join(folder, "cmff")
    threshold = cv.fold_threshold(cmff_dir, checkpoint, float(config.oof.et_min_mm3))
    per_subject = cv.out_of_fold(cmff_dir, held_out, config.oof, checkpoint, threshold,
                                 os.path.join(folder, "predictions"))
    record = {"fold": k, "config": key, "split": split, "checkpoint": checkpoint, "et_min_mm3": threshold,
              "metrics": cv.fold_metrics(per_subject),
              "metrics_postprocessed": cv.fold_metrics([s["postprocessed"] for s in per_subject]),
              "true_et_removed": sum(s["true_et_removed"] for s in per_subject),
              "subjects": per_subject, "seconds": time.perf_counter() - start}
    write_text(os.path.join(folder, FOLD_FILE), json.dumps(record, indent=1))
    return record


def predict_command(workdir: str, root: str) -> str:
    """The command that predicts with this run's fold ensemble (on its own data root; give another)."""
    return (f"python -m cmfl_jax.main --config=configs/predict.py --workdir={os.path.join(workdir, 'predict')} "
            f"--config.model_dir={workdir} --config.data.root={root}")


def write_summary(config: ml_collections.ConfigDict, workdir: str, records: list[dict]) -> str:
    """``cv_summary.json`` (what ``predict`` reads of an ensemble: ``models``, ``postprocess``) and
    ``cv_summary.md``; returns the Markdown."""
    root = resolve_root(config.data)
    per_fold = [r["metrics"] for r in records]
    processed = [r["metrics_postprocessed"] for r in records]
    summary = {
        "folds": len(records),
        "models": [os.path.join(f"fold{r['fold']}", "cmff") for r in records],  # relative: the run can move
        "checkpoint": records[0]["checkpoint"],
        "per_fold": per_fold,
        **cv.summarize(per_fold),
        "per_fold_postprocessed": processed,
        "postprocessed": cv.summarize(processed),
        "true_et_removed": sum(r["true_et_removed"] for r in records),
        # for new subjects (predict with this workdir): the median of the folds' own thresholds, none of them
        # tuned on a scored subject
        "postprocess": {"et_min_mm3": float(np.median([r["et_min_mm3"] for r in records]))},
        "data": {"root": root, "folds": len(records), "seed": int(config.data.split.seed)},
        "predict_command": predict_command(workdir, root),
    }
    text = cv.summary_markdown(summary, workdir, summary["predict_command"])
    write_text(os.path.join(workdir, "cv_summary.md"), text.rstrip("\n"))
    write_text(os.path.join(workdir, CV_SUMMARY), json.dumps(summary, indent=1))
    return text


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    start = time.perf_counter()
    folds = _folds(config)
    root = resolve_root(config.data)  # generates the synthetic data set on first use
    records = []
    for k in range(folds):
        record = run_fold(config, workdir, k, root)
        if record is None:
            logging.info("cv: fold %d stopped before its last step; run the same command to resume", k)
            return
        records.append(record)
    text = write_summary(config, workdir, records)
    logging.info("cv: %d folds in %s this run", folds, format_seconds(time.perf_counter() - start))
    print(text, end="", flush=True)
