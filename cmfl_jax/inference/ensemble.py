"""Several trained models as one predictor: the mean of their probability maps, turned into labels once.

Cross-validation (``configs/cv.py``) leaves one CMFF model per fold; predicting with all of them is a fold
ensemble. Each model predicts the whole volume with its own window, pairing and mirroring; the ensemble is the
mean of those probability maps, and :meth:`VolumePredictor.labels` converts the mean to labels (the one place
probabilities become labels), so averaging stays on probabilities. Memory: a running sum, one model's output
at a time, so two probability volumes whatever the number of models.

``config.model_dir`` names the models: one folder (a CMFF workdir or a bundle, as before), several separated by
commas, or a CV workdir, which stands for its folds' CMFF runs (listed in its ``cv_summary.json``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import numpy as np

from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.stablehlo import VolumePredictor

CV_SUMMARY = "cv_summary.json"  # in a CV workdir: the folds' models and their ET threshold
KEY = "config.model_dir"
# What every member must share: the ensemble pre-processes each subject once and converts the mean once.
AGREE = ("output", "normalization", "label_set")


def fold_dir(cv_workdir: str, fold: int) -> str:
    """``<cv_workdir>/fold<k>``: one fold's split, CMFT and CMFF runs and out-of-fold metrics."""
    return os.path.join(cv_workdir, f"fold{fold}")


def read_cv_summary(cv_workdir: str) -> dict:
    """The ``cv_summary.json`` of a finished CV workdir (a one-line error when the run has not finished)."""
    path = os.path.join(cv_workdir, CV_SUMMARY)
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        raise CMFLError(path, f"cannot read the cross-validation summary ({type(e).__name__}); run the CV "
                              "command (configs/cv.py) again to finish it") from e
    if not isinstance(summary, dict) or not isinstance(summary.get("models"), list) or not summary["models"]:
        raise CMFLError(path, "malformed cross-validation summary: no 'models' list")
    return summary


def _is_cv_workdir(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("job") == "cv"
    except (OSError, ValueError, AttributeError):
        return False


def _cv_run_of(model_dir: str) -> str | None:
    """The CV workdir that a fold's CMFF run (``<cv>/fold<k>/cmff``) lies in, or None."""
    fold = os.path.dirname(os.path.normpath(os.path.abspath(model_dir)))
    cv = os.path.dirname(fold)
    return cv if re.fullmatch(r"fold\d+", os.path.basename(fold)) and _is_cv_workdir(cv) else None


def model_dirs(spec: str) -> tuple[list[str], dict | None]:
    """(the model folders of ``config.model_dir``, the CV summary when they all come from one CV run).

    A single CV workdir stands for its folds' CMFF runs; the summary's ET threshold then applies.
    """
    dirs = [d.strip() for d in spec.split(",") if d.strip()]
    if not dirs:
        raise CMFLError(KEY, "is empty: give the workdir of a CMFF run (configs/cmff.py) or a bundle "
                             "(configs/export.py)")
    if len(dirs) == 1 and _is_cv_workdir(dirs[0]):
        summary = read_cv_summary(dirs[0])
        return [os.path.join(dirs[0], m) for m in summary["models"]], summary
    if len(set(map(os.path.abspath, dirs))) != len(dirs):
        raise CMFLError(KEY, f"names a model twice ({spec}): each model of an ensemble counts once")
    runs = {_cv_run_of(d) for d in dirs}
    one_run = runs.pop() if len(runs) == 1 else None
    return dirs, read_cv_summary(one_run) if one_run and len(dirs) > 1 else None


class EnsemblePredictor(VolumePredictor):
    """The mean probability map of ``members`` (each a predictor with its own window), as one predictor."""

    def __init__(self, members: Sequence[VolumePredictor]):
        if len(members) < 2:
            raise CMFLError(KEY, "an ensemble needs at least 2 models")
        for attr in AGREE:
            values = [getattr(m, attr, None) for m in members]
            if len(set(values)) > 1:
                names = [getattr(v, "name", v) for v in values]
                raise CMFLError(KEY, f"the models disagree on {attr} ({', '.join(map(str, names))}): the models "
                                     "of an ensemble must be trained alike")
        self.members = list(members)
        for attr in AGREE:  # the output kind decides how labels() converts the mean
            setattr(self, attr, getattr(members[0], attr))
        self.multiple = max(getattr(m, "multiple", 1) for m in members)  # powers of two: the largest serves all
        self.sources = [m.source for m in members]
        self.source = self.sources[0]

    def probabilities(self, image: np.ndarray, overlap: float = 0.5, batch_size: int = 1, mirror: bool = False,
                      window: tuple[int, ...] | None = None) -> np.ndarray:
        """The members' mean probabilities (a running sum: one member's output in memory at a time)."""
        total = None
        for member in self.members:
            probs = np.asarray(member.probabilities(image, overlap, batch_size, mirror, window), np.float32)
            if total is None:
                total = probs.copy()
            elif probs.shape != total.shape:
                raise CMFLError(KEY, f"{member.source} outputs {probs.shape[-1]} channel(s) of shape "
                                     f"{probs.shape[:-1]}, {self.source} {total.shape[-1]} of {total.shape[:-1]}: "
                                     "the models of an ensemble must predict the same outputs")
            else:
                total += probs
            del probs
        return total / np.float32(len(self.members))
