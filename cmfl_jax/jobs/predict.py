"""The ``predict`` job (``configs/predict.py``): full-volume prediction to NIfTI from a CMFF workdir or bundle.

The predictor (:mod:`cmfl_jax.inference.predictor`) is the model of the run's ``config.json`` with
the params of ``best/``, ``final/``, ``checkpoints/`` or a bundle. Each
subject is read and checked as in training, z-scored, predicted whole by sliding windows
(:func:`cmfl_jax.inference.sliding_window`), set to background outside the brain, and written as
``<subject_id>.nii.gz`` with the input's affine and header in the dataset's own label convention
(ET = 4, or 3 for BraTS 2023+), atomically.
"""

from __future__ import annotations

import os
import time

import ml_collections
import nibabel as nib
import numpy as np
from absl import logging

from cmfl_jax.data.dataset import resolve_root
from cmfl_jax.data.io import load_subject, write_nifti
from cmfl_jax.data.layouts import Subject, discover, to_dataset
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.predictor import load_predictor
from cmfl_jax.previews import save_orthogonal_png
from cmfl_jax.progress import progress


def _label_header(header: nib.Nifti1Header) -> nib.Nifti1Header:
    """The input's header for a label map: its geometry, no intensity scaling."""
    header = header.copy()
    header.set_slope_inter(1.0, 0.0)
    return header


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if not config.model_dir:
        raise CMFLError("config.model_dir", "is empty: give the workdir of a CMFF run (configs/cmff.py) or a bundle "
                                            "(configs/export.py)")
    subjects: list[Subject] = discover(resolve_root(config.data), require_labels=False)  # before the model: cheap
    predictor = load_predictor(config.model_dir, config.checkpoint)
    out_dir = config.out_dir or os.path.join(workdir, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    for subject in progress(subjects, desc="predict: subject"):
        start = time.perf_counter()
        loaded = load_subject(subject, with_label=bool(config.overlays))  # the label only to draw it
        image = predictor.model_input(loaded)
        pred, probs = predictor.labels(image, config.overlap, config.batch_size, config.mirror)
        header = _label_header(loaded.header)
        write_nifti(os.path.join(out_dir, f"{subject.subject_id}.nii.gz"), to_dataset(pred, subject.et_label),
                    loaded.affine, header)
        if config.save_probabilities:
            write_nifti(os.path.join(out_dir, f"{subject.subject_id}_probabilities.nii.gz"), probs.astype(np.float32),
                        loaded.affine, header)
        if config.overlays:
            save_orthogonal_png(os.path.join(workdir, "overlays", f"{subject.subject_id}.png"), image, pred,
                                loaded.label, title=subject.subject_id)
        logging.info("predict: %s in %.1f s", subject.subject_id, time.perf_counter() - start)
    logging.info("predict: %d subject(s) written to %s", len(subjects), out_dir)
