"""CMFF validation: sliding-window prediction of the held-out subjects, BraTS metrics, and the best model.

Bounded: the periodic validations see a fixed subset of the held-out fold, its first ``val.max_subjects`` ids
in sorted order (0: all), and with ``val.full_at_end`` the last step sees the whole fold. The score that picks
the best checkpoint (``best/``) is, by ``val.metric``, the mean Dice over the label set's regions (``legacy``:
``dice_mean``; ET, WT, TC, and RC for BraTS 2024 GLI post-treatment) or the mean over ET, WT and TC of the
2023-2024 leaderboards' lesion-wise Dice (``lesionwise``: ``ranked_dice_mean``, :mod:`cmfl_jax.lesion_metrics`;
``ranked_dice_<R>`` and ``ranked_hd95_<R>`` are logged too) **of the subset**, at every validation
including the last (whose subset score is the mean over the same first subjects of the whole-fold run), so
the best model is chosen among like scores. Logged under ``val/``: the subset's metrics, ``subjects`` and
``seconds`` (the validation's wall time); at a whole-fold validation also ``full/<metric>`` and
``full/subjects``; ``final/`` keeps the whole fold's metrics.

Each validation also tunes the BraTS post-processing (:mod:`cmfl_jax.postprocess`): the ET volume threshold
of the grid with the best mean ET Dice (of the ``val.metric`` family) over the subjects it saw, logged as
``et_min_mm3`` and ``dice_ET_postprocessed`` and kept in the checkpoint meta (``postprocess``), from where
prediction and the bundle take it.
"""

from __future__ import annotations

import functools
import os
import time

import ml_collections
import numpy as np
from absl import logging

from cmfl_jax import checkpoints
from cmfl_jax.data.cached_subject import uncrop
from cmfl_jax.inference.sliding_window import cmff_predict_fn, restrict_to_brain, sliding_window
from cmfl_jax.label_classes import probs_to_labels
from cmfl_jax.label_sets import run_label_set
from cmfl_jax.lesion_metrics import leaderboard_lesionwise_metrics
from cmfl_jax.metrics import REGIONS, brats_metrics
from cmfl_jax.models import builder
from cmfl_jax.postprocess import et_statistics, tune_et_threshold
from cmfl_jax.previews import save_segmentation_png
from cmfl_jax.progress import progress

SELECTION = {"legacy": "dice_mean", "lesionwise": "ranked_dice_mean"}  # val.metric -> the best-model score


def validation_summary(per_subject: list[dict]) -> dict[str, float]:
    """Mean over subjects of each region's metrics, plus ``dice_mean`` over the regions; with the lesion-wise
    figures (``"ranked"``) also ``ranked_dice_<R>``, ``ranked_hd95_<R>`` and ``ranked_dice_mean`` over ET, WT, TC."""
    out = {}
    regions = [r for r, v in per_subject[0].items() if isinstance(v, dict) and "dice" in v] if per_subject \
        else list(REGIONS)
    for region in regions:
        for metric in ("dice", "hd95", "sensitivity", "specificity"):
            out[f"{metric}_{region}"] = float(np.mean([m[region][metric] for m in per_subject]))
    out["dice_mean"] = float(np.mean([out[f"dice_{r}"] for r in regions]))
    if all("ranked" in m for m in per_subject):
        for region in REGIONS:
            for metric in ("dice", "hd95"):
                out[f"ranked_{metric}_{region}"] = float(np.mean([m["ranked"][region][f"lesionwise_{metric}"]
                                                                  for m in per_subject]))
        out["ranked_dice_mean"] = float(np.mean([out[f"ranked_dice_{r}"] for r in REGIONS]))
    return out


def score_subject(pred: np.ndarray, label: np.ndarray, spacing, metric: str = "legacy", regions=None) -> dict:
    """One subject's BraTS metrics per region (``regions``: a label set's internal regions; default ET, WT, TC)
    and the ET statistics the post-processing is tuned on (``"et_stats"``): what validation and the
    cross-validation's out-of-fold scoring record alike. With ``metric="lesionwise"`` also the leaderboards'
    lesion-wise figures (``"ranked"``), and the ET statistics of that family."""
    if metric not in SELECTION:
        raise ValueError(f"val.metric must be one of {', '.join(SELECTION)}, got {metric!r}")
    out = {**brats_metrics(pred, label, spacing, regions), "et_stats": et_statistics(pred, label, spacing, metric)}
    if metric == "lesionwise":
        out["ranked"] = leaderboard_lesionwise_metrics(pred, label, spacing)
    return out


def tuned_postprocess(per_subject: list[dict]) -> dict:
    """``{"et_min_mm3", "dice_ET", "subjects"}``: the ET threshold tuned on these subjects and its mean ET Dice."""
    threshold, scores = tune_et_threshold([m["et_stats"] for m in per_subject])
    return {"et_min_mm3": threshold, "dice_ET": scores[threshold], "subjects": len(per_subject)}


class Validator:
    """Sliding-window prediction of the held-out subjects, BraTS metrics, an overlay PNG, and the best model."""

    def __init__(self, config: ml_collections.ConfigDict, entries: list, workdir: str):
        self.config, self.workdir = config, workdir
        v = config.val
        self.entries = sorted(entries, key=lambda e: e.subject_id)  # the whole held-out fold
        self.subset = self.entries[: v.max_subjects] if v.max_subjects > 0 else self.entries
        self.output, self.labels = config.model.get("output", "classes"), run_label_set(config)
        model = builder.cmff_net(config.model, self.labels.num_classes)
        self.predict = cmff_predict_fn(model, config.data.pairing, mirror=v.mirror)
        self.metric = v.get("metric", "legacy")
        if self.metric not in SELECTION:
            raise ValueError(f"config.val.metric must be one of {', '.join(SELECTION)}, got {self.metric!r}")
        self.key = SELECTION[self.metric]
        self.best_manager = checkpoints.make_manager(workdir, 1, subdir="best")
        meta = checkpoints.read_meta(self.best_manager)
        self.best = float(meta["val"].get(self.key, -1.0)) if meta else -1.0
        self.scores: dict[str, float] = {}  # of the last validation: the whole fold's when it saw it, for final/
        self.postprocess: dict = {}  # tuned at the last validation, for final/

    def due(self, step: int) -> bool:
        return bool(self.entries) and (step % self.config.val.every == 0 or step == self.config.train.steps)

    def whole_fold(self, step: int) -> bool:
        return bool(self.config.val.full_at_end) and step == self.config.train.steps

    def evaluate(self, params: dict, entries: list, step: int | None = None) -> tuple[list[dict], tuple]:
        """BraTS metrics of each of ``entries`` (with the ET statistics post-processing is tuned on, under
        ``"et_stats"``); also (subject, image, label, pred, WT Dice) of the first."""
        v, window = self.config.val, tuple(self.config.data.patch_size)
        predict = functools.partial(self.predict, params)
        per_subject, first = [], None
        for entry in progress(entries, desc=f"cmff validation (step {step}): subject"):
            image = uncrop(entry.image(), entry)  # the full grid: the tiling and the metrics of the raw volume
            probs = sliding_window(predict, image, window, v.overlap, v.batch_size)
            pred = restrict_to_brain(probs_to_labels(probs, self.output, self.labels.classes), image)
            label = uncrop(entry.label(), entry)
            per_subject.append(score_subject(pred, label, entry.meta["spacing"], self.metric,
                                             self.labels.internal_regions))
            if first is None:
                first = (entry.subject_id, image, label, pred, per_subject[0]["WT"]["dice"])
        return per_subject, first

    def __call__(self, step: int, states: dict) -> dict[str, float]:
        """Validate at ``step``; the record logged under ``val/`` (see the module's docstring)."""
        whole = self.whole_fold(step)
        entries = self.entries if whole else self.subset
        start = time.perf_counter()
        per_subject, (subject, image, label, pred, dice_wt) = self.evaluate(states["seg"].params, entries, step)
        seconds = time.perf_counter() - start
        logging.info("cmff: validation of %d subjects took %.1f s (step %d%s)", len(entries), seconds, step,
                     ", the whole held-out fold" if whole else "")
        metrics = validation_summary(per_subject[: len(self.subset)])  # self.subset leads self.entries
        tuned = tuned_postprocess(per_subject[: len(self.subset)])
        record = {**metrics, "subjects": len(self.subset), "seconds": seconds,
                  "et_min_mm3": tuned["et_min_mm3"], "dice_ET_postprocessed": tuned["dice_ET"]}
        self.scores = {**metrics, "subjects": len(self.subset)}
        self.postprocess = tuned
        if whole:
            full = validation_summary(per_subject)
            record.update({f"full/{k}": x for k, x in {**full, "subjects": len(entries)}.items()})
            self.scores = {**full, "subjects": len(entries)}
            self.postprocess = tuned_postprocess(per_subject)
        save_segmentation_png(os.path.join(self.workdir, "previews", f"cmff_val_{step:07d}.png"), image, label, pred,
                              title=f"CMFF step {step}, {subject}: WT Dice {dice_wt:.3f} (mean over "
                                    f"{len(self.subset)} validation subjects {metrics['dice_WT']:.3f})")
        if metrics[self.key] > self.best:
            self.best = metrics[self.key]
            checkpoints.save(self.best_manager, step, states, {"step": step, "val": {
                **metrics, "subjects": len(self.subset)}, "postprocess": tuned}, force=True)
            logging.info("cmff: new best %s %.4f over %d validation subjects at step %d (saved to %s)",
                         self.key, self.best, len(self.subset), step, self.best_manager.directory)
        return record

    def close(self) -> None:
        checkpoints.close(self.best_manager)
