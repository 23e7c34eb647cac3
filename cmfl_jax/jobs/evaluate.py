"""BraTS evaluation of predictions against labels (``configs/evaluate.py``).

For every labelled subject of a data root, its ``<subject_id>.nii.gz`` in the predictions folder
(the dataset's label convention, as ``configs/predict.py`` writes it) is scored with
:func:`cmfl_jax.metrics.brats_metrics` using the label's voxel spacing, over the regions of the subjects' label
set (``config.data.label_set``; ET, WT, TC, plus RC for BraTS 2024 GLI post-treatment, NETC, CC, ED for PED).
Outputs, written atomically: ``evaluation_per_subject.csv``; ``evaluation_summary.csv`` and ``.md`` in the
paper's table layout (Dice and HD95 per region and their average; rows mean, std (population, ``np.std``),
median, 25th and 75th percentile); ``evaluation_boxplot.png``.
"""

from __future__ import annotations

import csv
import io
import os

import ml_collections
import numpy as np
from absl import logging

from cmfl_jax.data.dataset import resolve_root
from cmfl_jax.data.io import atomic_path, read_nifti
from cmfl_jax.data.layouts import Subject, discover, to_internal
from cmfl_jax.errors import CMFLError
from cmfl_jax.label_sets import KEY, check_values
from cmfl_jax.metrics import METRIC_NAMES, REGIONS, brats_metrics
from cmfl_jax.previews import new_figure, save_figure
from cmfl_jax.progress import progress

STATISTICS = {
    "mean": np.mean,
    "std": np.std,
    "median": np.median,
    "25quantile": lambda v: np.percentile(v, 25),
    "75quantile": lambda v: np.percentile(v, 75),
}


def summary_columns(regions=REGIONS) -> list[str]:
    """Dice per region and their average, then HD95 likewise (the paper's table)."""
    return [f"dice_{r}" for r in regions] + ["dice_average"] + [f"hd95_{r}" for r in regions] + ["hd95_average"]


SUMMARY_COLUMNS = summary_columns()


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
    metrics = brats_metrics(to_internal(pred, ls), to_internal(label, ls), spacing, ls.internal_regions)
    row = {"subject_id": subject.subject_id}
    for region in ls.regions:
        for name in METRIC_NAMES:
            row[f"{name}_{region}"] = float(metrics[region][name])
    return row


def summary_statistics(rows: list[dict], regions=REGIONS) -> dict[str, dict[str, float]]:
    """``{statistic: {column: value}}`` over subjects, columns of :func:`summary_columns`."""
    values = {c: np.array([r[c] for r in rows], np.float64) for c in rows[0] if c != "subject_id"}
    for metric in ("dice", "hd95"):
        values[f"{metric}_average"] = np.mean([values[f"{metric}_{r}"] for r in regions], axis=0)
    return {s: {c: float(f(values[c])) for c in summary_columns(regions)} for s, f in STATISTICS.items()}


def summary_markdown(summary: dict[str, dict[str, float]], regions=REGIONS) -> str:
    """The paper's layout: Dice ET, WT, TC, average | HD95 ET, WT, TC, average; one row per statistic."""
    head = "| | " + " | ".join(f"Dice {r}" for r in (*regions, "avg")) + " | " + \
        " | ".join(f"HD95 {r}" for r in (*regions, "avg")) + " |"
    columns = summary_columns(regions)
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for stat, row in summary.items():
        cells = [f"{row[c]:.4f}" if c.startswith("dice") else f"{row[c]:.2f}" for c in columns]
        lines.append(f"| {stat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    table = summary_markdown(summary, regions)
    with atomic_path(os.path.join(workdir, "evaluation_summary.md")) as tmp, open(tmp, "w") as f:
        f.write(table + "\n")
    save_boxplot(os.path.join(workdir, "evaluation_boxplot.png"), rows, regions)
    print(f"{len(rows)} subjects\n{table}")
    logging.info("evaluate: results in %s", workdir)
