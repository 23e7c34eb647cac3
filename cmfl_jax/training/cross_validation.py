"""What cross-validation (``configs/cv.py``) computes: out-of-fold scores, each fold's own threshold, the summary.

Each fold's CMFF model (``best/``, picked on the fold's selection subjects, or ``final/``) predicts its held-out
subjects as ``predict`` does (whole raw volumes, the predictor's own label conversion), and each is scored twice:
as predicted, and post-processed with the fold's own ET threshold (:func:`fold_threshold`: tuned by CMFF's
validation on the selection subjects, or fixed), so each subject is scored by a model, a checkpoint and a
threshold that never saw it. Lesion-wise (2023-2024 leaderboard) figures come with the legacy ones.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging

from cmfl_jax import checkpoints
from cmfl_jax.data.io import load_subject, write_nifti
from cmfl_jax.data.subject import Subject
from cmfl_jax.inference.predictor import load_workdir
from cmfl_jax.label_sets import to_dataset
from cmfl_jax.lesion_metrics import leaderboard_lesionwise_metrics
from cmfl_jax.metrics import REGIONS
from cmfl_jax.postprocess import ET, postprocess, resolve_et_threshold
from cmfl_jax.progress import progress
from cmfl_jax.training.validation import score_subject, validation_summary

SUMMARY_METRICS = ("dice", "hd95")  # per region in the summary's table


def fold_threshold(model_dir: str, checkpoint: str, configured: float) -> float:
    """The ET threshold of a fold's held-out subjects, as ``predict`` resolves ``postprocess.et_min_mm3``:
    ``configured`` when >= 0 (0: off), else the one CMFF's validation tuned on the fold's selection subjects (kept
    with ``best/``), else (``final/``, no selection subject) the default."""
    tuned = None
    if configured < 0 and checkpoint == "best":
        manager = checkpoints.make_manager(model_dir, 1, subdir="best")
        try:
            tuned = checkpoints.read_meta(manager)["postprocess"]["et_min_mm3"]
        finally:
            checkpoints.close(manager)
    return resolve_et_threshold(configured, tuned)


def _scores(pred: np.ndarray, label: np.ndarray, spacing, regions) -> dict:
    metrics = score_subject(pred, label, spacing, regions=regions)
    out = {r: {k: float(v) for k, v in metrics[r].items()} for r in regions}
    if set(regions) == set(REGIONS):  # the leaderboards' rules are for ET, WT, TC
        out["ranked"] = leaderboard_lesionwise_metrics(pred, label, spacing)
    return {**out, "et_stats": list(metrics["et_stats"])}


def out_of_fold(model_dir: str, subjects: Sequence[Subject], settings: Mapping, checkpoint: str,
                et_min_mm3: float, predictions: str | None = None) -> list[dict]:
    """Per held-out subject: ``{"subject_id", <region>: metrics, "ranked", "et_stats"}`` as predicted by the fold's
    model with ``settings`` (``overlap``, ``batch_size``, ``mirror``, ``wt_min_mm3``), the same under
    ``"postprocessed"`` (``et_min_mm3``, ``wt_min_mm3``), and ``"true_et_removed"``: post-processing erased
    predicted ET of a subject that has ET. The post-processed labels go to ``predictions/<id>.nii.gz``."""
    predictor = load_workdir(model_dir, checkpoint)
    regions = predictor.label_set.internal_regions
    out = []
    for subject in progress(list(subjects), desc="cv: out-of-fold subject"):
        start = time.perf_counter()
        loaded = load_subject(subject, with_label=True)
        image = predictor.model_input(loaded)
        pred, _ = predictor.labels(image, settings["overlap"], settings["batch_size"], settings["mirror"])
        final = postprocess(pred, loaded.spacing, et_min_mm3, float(settings["wt_min_mm3"]))
        if predictions:
            write_nifti(f"{predictions}/{subject.subject_id}.nii.gz", to_dataset(final, subject.labels),
                        loaded.affine)
        raw = _scores(pred, loaded.label, loaded.spacing, regions)
        processed = raw if np.array_equal(final, pred) else _scores(final, loaded.label, loaded.spacing, regions)
        removed = bool(np.any(loaded.label == ET) and np.any(pred == ET) and not np.any(final == ET))
        out.append({"subject_id": subject.subject_id, **raw, "postprocessed": processed,
                    "true_et_removed": removed})
        logging.info("cv: %s scored in %.1f s (Dice ET %.3f, WT %.3f, TC %.3f; post-processed %.3f %.3f %.3f)",
                     subject.subject_id, time.perf_counter() - start,
                     *(d[r]["dice"] for d in (raw, processed) for r in ("ET", "WT", "TC")))
    return out


def fold_metrics(per_subject: Sequence[Mapping]) -> dict[str, float]:
    """A fold's mean metrics over its held-out subjects (the validation's summary) and their number."""
    return {**validation_summary(list(per_subject)), "subjects": len(per_subject)}


def summarize(per_fold: Sequence[Mapping[str, float]]) -> dict:
    """``{"mean", "std"}`` over folds (population std, ``np.std``) of every metric of :func:`fold_metrics`."""
    keys = [k for k in per_fold[0] if k != "subjects"]
    return {stat: {k: float(fn([f[k] for f in per_fold])) for k in keys}
            for stat, fn in (("mean", np.mean), ("std", np.std))}


def summary_markdown(summary: Mapping, workdir: str, command: str) -> str:
    """``cv_summary.md``: per-fold and mean ± std Dice and HD95, as predicted and post-processed."""
    regions = [k[len("dice_"):] for k in summary["mean"] if k.startswith("dice_") and k != "dice_mean"] or REGIONS
    columns = [f"{m}_{r}" for m in SUMMARY_METRICS for r in regions]  # the label set's regions (RC for GLI 2024)
    header = " | ".join(c.replace("dice", "Dice").replace("hd95", "HD95").replace("_", " ") for c in columns)
    lines = [
        f"# Cross-validation: {len(summary['per_fold'])} folds",
        "",
        f"Each fold's CMFT and CMFF trained without its held-out subjects, its checkpoint (`{summary['checkpoint']}/`) "
        f"and ET threshold chosen without them; their scores (HD95 in mm). Folds under `{workdir}/fold<k>/`.",
    ]
    subjects = sum(f["subjects"] for f in summary["per_fold"])
    for title, per_fold, stats in (("as predicted", summary["per_fold"], summary),
                                   ("post-processed with each fold's own threshold",
                                    summary["per_fold_postprocessed"], summary["postprocessed"])):
        lines += ["", f"{title}:", "", f"| fold | subjects | {header} |", "|" + "---|" * (len(columns) + 2)]
        for k, fold in enumerate(per_fold):
            lines.append(f"| {k} | {fold['subjects']} | " + " | ".join(f"{fold[c]:.4f}" for c in columns) + " |")
        mean, std = stats["mean"], stats["std"]
        lines.append(f"| mean ± std | {subjects} | " + " | ".join(f"{mean[c]:.4f} ± {std[c]:.4f}" for c in columns)
                     + " |")
    lines += [
        "",
        f"Post-processing removed the predicted ET of {summary['true_et_removed']} subject(s) that have ET.",
        "",
        f"Predict with the fold ensemble (the mean of the folds' probabilities; ET under "
        f"{summary['postprocess']['et_min_mm3']:g} mm³, the median of the folds' thresholds, becomes NCR/NET):",
        "",
        f"    {command}",
    ]
    return "\n".join(lines) + "\n"
