"""What cross-validation (``configs/cv.py``) computes: out-of-fold scores, the pooled tuning, the summary.

Each fold's CMFF model (``best/``) predicts its held-out subjects as ``predict`` does (whole raw volumes, the
predictor's own label conversion); their BraTS metrics and the ET statistics post-processing is tuned on are
kept per subject in the fold's folder, so the ET threshold is tuned once on the union of every fold's held-out
subjects (:func:`pooled_postprocess`, the validation's own :func:`tuned_postprocess`): each subject is scored by
a model that never saw it, and the threshold sees every subject once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging

from cmfl_jax.data.io import load_subject
from cmfl_jax.data.subject import Subject
from cmfl_jax.inference.predictor import load_workdir
from cmfl_jax.metrics import REGIONS
from cmfl_jax.progress import progress
from cmfl_jax.training.validation import score_subject, tuned_postprocess, validation_summary

SUMMARY_METRICS = ("dice", "hd95")  # per region in the summary's table


def out_of_fold(model_dir: str, subjects: Sequence[Subject], settings: Mapping, checkpoint: str = "best"
                ) -> list[dict]:
    """``{"subject_id", <region>: metrics, "et_stats"}`` of each held-out subject, predicted by the fold's model
    with ``settings`` (``overlap``, ``batch_size``, ``mirror``)."""
    predictor = load_workdir(model_dir, checkpoint)
    out = []
    for subject in progress(list(subjects), desc="cv: out-of-fold subject"):
        start = time.perf_counter()
        loaded = load_subject(subject, with_label=True)
        image = predictor.model_input(loaded)
        pred, _ = predictor.labels(image, settings["overlap"], settings["batch_size"], settings["mirror"])
        regions = predictor.label_set.internal_regions
        metrics = score_subject(pred, loaded.label, loaded.spacing, regions=regions)
        out.append({"subject_id": subject.subject_id,
                    **{r: {k: float(v) for k, v in metrics[r].items()} for r in regions},
                    "et_stats": list(metrics["et_stats"])})
        logging.info("cv: %s scored in %.1f s (Dice ET %.3f, WT %.3f, TC %.3f)", subject.subject_id,
                     time.perf_counter() - start, *(metrics[r]["dice"] for r in ("ET", "WT", "TC")))
    return out


def pooled_postprocess(folds: Sequence[Sequence[Mapping]]) -> dict:
    """The ET threshold tuned on the union of the folds' out-of-fold subjects (each a list of records with
    ``et_stats``), with its mean ET Dice and the number of subjects."""
    return tuned_postprocess([s for fold in folds for s in fold])


def fold_metrics(per_subject: Sequence[Mapping]) -> dict[str, float]:
    """A fold's mean metrics over its held-out subjects (the validation's summary) and their number."""
    return {**validation_summary(list(per_subject)), "subjects": len(per_subject)}


def summarize(per_fold: Sequence[Mapping[str, float]]) -> dict:
    """``{"mean", "std"}`` over folds (population std, ``np.std``) of every metric of :func:`fold_metrics`."""
    keys = [k for k in per_fold[0] if k != "subjects"]
    return {stat: {k: float(fn([f[k] for f in per_fold])) for k in keys}
            for stat, fn in (("mean", np.mean), ("std", np.std))}


def summary_markdown(summary: Mapping, workdir: str, command: str) -> str:
    """``cv_summary.md``: per-fold and mean ± std Dice and HD95 per region, the pooled threshold, the ensemble."""
    regions = [k[len("dice_"):] for k in summary["mean"] if k.startswith("dice_") and k != "dice_mean"] or REGIONS
    columns = [f"{m}_{r}" for m in SUMMARY_METRICS for r in regions]  # the label set's regions (RC for GLI 2024)
    header = " | ".join(c.replace("dice", "Dice").replace("hd95", "HD95").replace("_", " ") for c in columns)
    lines = [
        f"# Cross-validation: {len(summary['per_fold'])} folds",
        "",
        f"Each fold's CMFT and CMFF trained without its held-out subjects; scores of each fold's CMFF `best/` on "
        f"them (HD95 in mm). Folds under `{workdir}/fold<k>/`.",
        "",
        f"| fold | subjects | {header} |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for k, fold in enumerate(summary["per_fold"]):
        lines.append(f"| {k} | {fold['subjects']} | " + " | ".join(f"{fold[c]:.4f}" for c in columns) + " |")
    mean, std = summary["mean"], summary["std"]
    subjects = sum(f["subjects"] for f in summary["per_fold"])
    lines.append(f"| mean ± std | {subjects} | " + " | ".join(f"{mean[c]:.4f} ± {std[c]:.4f}" for c in columns)
                 + " |")
    pp = summary["postprocess"]
    lines += [
        "",
        f"Post-processing tuned on the pooled out-of-fold predictions ({pp['subjects']} subjects): enhancing tumour "
        f"under {pp['et_min_mm3']:g} mm³ becomes NCR/NET (mean ET Dice {pp['dice_ET']:.4f}, "
        f"{summary['dice_ET_raw']:.4f} without it).",
        "",
        "Predict with the fold ensemble (the mean of the folds' probabilities, this threshold):",
        "",
        f"    {command}",
    ]
    return "\n".join(lines) + "\n"
