"""CMFF validation: sliding-window prediction of the held-out subjects, BraTS metrics, and the best model.

The score that picks the best checkpoint (``best/``) is the mean Dice over ET, WT and TC.
"""

from __future__ import annotations

import functools
import os

import ml_collections
import numpy as np
from absl import logging

from cmfl_jax.data.cached_subject import uncrop
from cmfl_jax.inference.sliding_window import cmff_predict_fn, restrict_to_brain, sliding_window
from cmfl_jax.label_classes import classes_to_labels
from cmfl_jax.metrics import REGIONS, brats_metrics
from cmfl_jax.models import builder
from cmfl_jax.previews import save_segmentation_png
from cmfl_jax.progress import progress
from cmfl_jax.training import checkpoints


def validation_summary(per_subject: list[dict]) -> dict[str, float]:
    """Mean over subjects of each region's metrics, plus ``dice_mean`` over ET, WT, TC (the best-model score)."""
    out = {}
    for region in REGIONS:
        for metric in ("dice", "hd95", "sensitivity", "specificity"):
            out[f"{metric}_{region}"] = float(np.mean([m[region][metric] for m in per_subject]))
    out["dice_mean"] = float(np.mean([out[f"dice_{r}"] for r in REGIONS]))
    return out


class Validator:
    """Sliding-window prediction of the held-out subjects, BraTS metrics, an overlay PNG, and the best model."""

    def __init__(self, config: ml_collections.ConfigDict, entries: list, workdir: str):
        self.config, self.entries, self.workdir = config, entries, workdir
        v = config.val
        self.predict = cmff_predict_fn(builder.cmff_net(config.model), config.data.pairing, mirror=v.mirror)
        self.best_manager = checkpoints.make_manager(workdir, 1, subdir="best")
        meta = checkpoints.read_meta(self.best_manager)
        self.best = float(meta["val"]["dice_mean"]) if meta else -1.0

    def due(self, step: int) -> bool:
        return bool(self.entries) and (step % self.config.val.every == 0 or step == self.config.train.steps)

    def evaluate(self, params: dict, step: int | None = None) -> tuple[dict[str, float], list]:
        """Metrics averaged over the validation subjects; also (subject, image, label, pred, WT Dice) of the first."""
        v, window = self.config.val, tuple(self.config.data.patch_size)
        predict = functools.partial(self.predict, params)
        per_subject, first = [], None
        for entry in progress(self.entries, desc=f"cmff validation (step {step}): subject"):
            image = uncrop(entry.image(), entry)  # the full grid: the tiling and the metrics of the raw volume
            probs = sliding_window(predict, image, window, v.overlap, v.batch_size)
            pred = restrict_to_brain(classes_to_labels(np.argmax(probs, axis=-1)), image)
            label = uncrop(entry.label(), entry)
            per_subject.append(brats_metrics(pred, label, entry.meta["spacing"]))
            if first is None:
                first = (entry.subject_id, image, label, pred, per_subject[0]["WT"]["dice"])
        return validation_summary(per_subject), first

    def __call__(self, step: int, states: dict) -> dict[str, float]:
        metrics, (subject, image, label, pred, dice_wt) = self.evaluate(states["seg"].params, step)
        save_segmentation_png(os.path.join(self.workdir, "previews", f"cmff_val_{step:07d}.png"), image, label, pred,
                              title=f"CMFF step {step}, {subject}: WT Dice {dice_wt:.3f} (mean over "
                                    f"{len(self.entries)} validation subjects {metrics['dice_WT']:.3f})")
        if metrics["dice_mean"] > self.best:
            self.best = metrics["dice_mean"]
            checkpoints.save(self.best_manager, step, states, {"step": step, "val": metrics}, force=True)
            logging.info("cmff: new best mean Dice %.4f at step %d (saved to %s)", self.best, step,
                         self.best_manager.directory)
        return metrics

    def close(self) -> None:
        checkpoints.close(self.best_manager)
