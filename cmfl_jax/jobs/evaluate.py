"""BraTS evaluation of predictions against labels (``configs/evaluate.py``).

For every labelled subject of a data root, its ``<subject_id>.nii.gz`` in the predictions folder
(the dataset's label convention, as ``configs/predict.py`` writes it) is scored, using the label's voxel spacing,
by both metric families: the legacy per-volume metrics (:func:`cmfl_jax.metrics.brats_metrics`, BraTS 2017-2022:
``dice_R``, ``hd95_R``, ``sensitivity_R``, ``specificity_R``, over the regions of the subjects' label set,
``config.data.label_set``: ET, WT, TC, plus RC for BraTS 2024 GLI post-treatment, NETC, CC, ED for PED) and the
lesion-wise ones over ET, TC, WT
(:mod:`cmfl_jax.lesion_metrics`): the 2023-2024 leaderboards' ``ranked_dice_R``, ``ranked_hd95_R`` (BraTS-GLI's
parameters) and the official package brats-evaluation's ``lesion_dice_R``, ``lesion_hd95_R``, ``lesion_f1_R``
(its mean over matched lesions; NaN where neither mask has a lesion, left out of the statistics as the package's
own summary does; an infinite HD95, no lesion matched, is reported as 373 as the package reports its global one).
Outputs, written atomically: ``evaluation_per_subject.csv``; ``evaluation_summary.csv`` and ``.md`` in the
paper's table layout (Dice and HD95 for ET, WT, TC and their average; rows mean, std (population, ``np.std``),
median, 25th and 75th percentile), one table per family; ``evaluation_boxplot.png`` (legacy).
"""

from __future__ import annotations

import csv
import io
import os
import warnings

import ml_collections
import numpy as np
from absl import logging

from cmfl_jax.data.dataset import resolve_root
from cmfl_jax.data.io import atomic_path, read_nifti
from cmfl_jax.data.layouts import Subject, discover, to_internal
from cmfl_jax.errors import CMFLError
from cmfl_jax.label_sets import KEY, check_values
from cmfl_jax.lesion_metrics import PACKAGE_PENALTY_HD95, brats_evaluation_metrics, leaderboard_lesionwise_metrics
from cmfl_jax.metrics import METRIC_NAMES, REGIONS, brats_metrics
from cmfl_jax.previews import new_figure, save_figure
from cmfl_jax.progress import progress

STATISTICS = {  # NaN (the package's figure without lesions) is left out; the legacy columns have none
    "mean": np.nanmean,
    "std": np.nanstd,
    "median": np.nanmedian,
    "25quantile": lambda v: np.nanpercentile(v, 25),
    "75quantile": lambda v: np.nanpercentile(v, 75),
}
# family -> (title, prefix of its Dice and HD95 columns)
FAMILIES = {
    "legacy": ("Legacy (per volume, BraTS 2017-2022)", ""),
    "ranked": ("Lesion-wise, 2023-2024 leaderboards (the organisers' script, BraTS-GLI)", "ranked_"),
    "lesion": ("Lesion-wise, brats-evaluation (mean over matched lesions)", "lesion_"),
}


def family_columns(prefix: str, regions=REGIONS) -> list[str]:
    """Dice per region and their average, then HD95 likewise (the paper's table); the lesion-wise families are
    scored over ET, WT, TC whatever the label set."""
    regions = regions if prefix == "" else REGIONS
    return [f"{prefix}{m}_{r}" for m in ("dice", "hd95") for r in (*regions, "average")]


def summary_columns(regions=REGIONS) -> list[str]:
    return [c for _, prefix in FAMILIES.values() for c in family_columns(prefix, regions)] + \
        [f"lesion_f1_{r}" for r in (*REGIONS, "average")]


def prediction_path(predictions: str, subject: Subject) -> str:
    return os.path.join(predictions, f"{subject.subject_id}.nii.gz")


def evaluate_subject(subject: Subject, pred_path: str) -> dict:
    """One row: ``subject_id`` and ``<metric>_<region>`` for every metric and region."""
    pred, _, _ = read_nifti(pred_path)
    label, _, header = read_nifti(subject.label)
    if pred.shape != label.shape:
        raise CMFLError(pred_path, f"shape {tuple(pred.shape)} differs from the label's {tuple(label.shape)}")
    ls = subject.labels
    check_values(pred_path, np.unique(pred).astype(int), ls)
    check_values(subject.label, np.unique(label).astype(int), ls)
    spacing = tuple(float(z) for z in header.get_zooms()[:3])
    pred, label = to_internal(pred, ls), to_internal(label, ls)
    metrics = brats_metrics(pred, label, spacing, ls.internal_regions)
    ranked = leaderboard_lesionwise_metrics(pred, label, spacing, "GLI")
    package = brats_evaluation_metrics(pred, label, spacing)
    row = {"subject_id": subject.subject_id}
    for region in ls.regions:
        for name in METRIC_NAMES:
            row[f"{name}_{region}"] = float(metrics[region][name])
    for region in REGIONS:
        row[f"ranked_dice_{region}"] = ranked[region]["lesionwise_dice"]
        row[f"ranked_hd95_{region}"] = ranked[region]["lesionwise_hd95"]
        row[f"lesion_dice_{region}"] = package[region]["lesionwise_dsc"]
        row[f"lesion_hd95_{region}"] = min(package[region]["lesionwise_hd95"], PACKAGE_PENALTY_HD95)
        row[f"lesion_f1_{region}"] = package[region]["f1"]
    return row


def summary_statistics(rows: list[dict], regions=REGIONS) -> dict[str, dict[str, float]]:
    """``{statistic: {column: value}}`` over subjects, columns of :func:`summary_columns`."""
    values = {c: np.array([r[c] for r in rows], np.float64) for c in rows[0] if c != "subject_id"}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column of NaN only: its statistics are NaN
        for metric in ("dice", "hd95", "ranked_dice", "ranked_hd95", "lesion_dice", "lesion_hd95", "lesion_f1"):
            over = regions if metric in ("dice", "hd95") else REGIONS
            values[f"{metric}_average"] = np.nanmean([values[f"{metric}_{r}"] for r in over], axis=0)
        return {s: {c: float(f(values[c])) for c in summary_columns(regions)} for s, f in STATISTICS.items()}


def summary_markdown(summary: dict[str, dict[str, float]], family: str = "legacy", regions=REGIONS) -> str:
    """The paper's layout: Dice per region, average | HD95 per region, average; one row per statistic."""
    prefix = FAMILIES[family][1]
    columns = family_columns(prefix, regions)
    names = regions if prefix == "" else REGIONS
    head = "| | " + " | ".join(f"Dice {r}" for r in (*names, "avg")) + " | " + \
        " | ".join(f"HD95 {r}" for r in (*names, "avg")) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for stat, row in summary.items():
        cells = [f"{row[c]:.2f}" if "hd95" in c else f"{row[c]:.4f}" for c in columns]
        lines.append(f"| {stat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_report(summary: dict[str, dict[str, float]], regions=REGIONS) -> str:
    """The legacy table, then one titled table per lesion-wise family and the package's mean instance F1."""
    parts = [summary_markdown(summary, "legacy", regions)]
    for family in ("ranked", "lesion"):
        parts.append(f"{FAMILIES[family][0]}:\n\n{summary_markdown(summary, family)}")
    f1 = summary["mean"]
    parts.append("brats-evaluation instance F1 (mean): " + ", ".join(
        f"{r} {f1[f'lesion_f1_{r}']:.4f}" for r in (*REGIONS, "average")))
    return "\n\n".join(parts)


def _write_csv(path: str, header: list[str], rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(buffer.getvalue())


def save_boxplot(path: str, rows: list[dict], regions=REGIONS) -> None:
    """Dice and HD95 per region, one box each."""
    plt, fig, axes = new_figure(1, 2, size=3.4)
    for ax, metric in zip(axes[0], ("dice", "hd95"), strict=True):
        ax.axis("on")
        ax.boxplot([[r[f"{metric}_{g}"] for r in rows] for g in regions], tick_labels=list(regions))
        ax.set_title("Dice" if metric == "dice" else "HD95 (mm)", fontsize=9)
        ax.grid(alpha=0.3)
    save_figure(plt, fig, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if not config.predictions:
        raise CMFLError("config.predictions", "is empty: give the folder of predictions (configs/predict.py)")
    if not os.path.isdir(config.predictions):
        raise CMFLError(config.predictions, "predictions folder (config.predictions) does not exist")
    subjects = discover(resolve_root(config.data), require_labels=True,
                        label_set=config.data.get("label_set", "auto"))
    regions = list(subjects[0].labels.regions)
    if any(list(s.labels.regions) != regions for s in subjects):
        raise CMFLError(KEY, "the subjects' label sets score different regions "
                             f"({', '.join(sorted({s.label_set for s in subjects}))}); evaluate them apart")
    missing = [prediction_path(config.predictions, s) for s in subjects
               if not os.path.isfile(prediction_path(config.predictions, s))]
    if missing:
        raise CMFLError(missing[0], f"prediction not found ({len(missing)} of {len(subjects)} subjects have none)")
    rows = [evaluate_subject(s, prediction_path(config.predictions, s))
            for s in progress(subjects, desc="evaluate: subject")]
    columns = [c for c in rows[0] if c != "subject_id"]
    os.makedirs(workdir, exist_ok=True)
    _write_csv(os.path.join(workdir, "evaluation_per_subject.csv"), ["subject_id", *columns],
               [[r["subject_id"], *(r[c] for c in columns)] for r in rows])
    summary, columns = summary_statistics(rows, regions), summary_columns(regions)
    _write_csv(os.path.join(workdir, "evaluation_summary.csv"), ["statistic", *columns],
               [[s, *(v[c] for c in columns)] for s, v in summary.items()])
    table = summary_report(summary, regions)
    with atomic_path(os.path.join(workdir, "evaluation_summary.md")) as tmp, open(tmp, "w") as f:
        f.write(table + "\n")
    save_boxplot(os.path.join(workdir, "evaluation_boxplot.png"), rows, regions)
    print(f"{len(rows)} subjects\n{table}")
    logging.info("evaluate: results in %s", workdir)
