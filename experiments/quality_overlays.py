"""One PNG per held-out case of ``experiments/quality.py``: the axial slice with the most tumour, FLAIR, the expert
label and each arm's out-of-fold prediction over it (BraTS colours: NCR/NET, oedema, enhancing tumour)."""

from __future__ import annotations

import glob
import os

import numpy as np

from cmfl_jax.data.io import load_subject, read_nifti
from cmfl_jax.data.layouts import discover
from cmfl_jax.previews import overlay, save_panels, tumour_slice


def prediction_path(workdir: str, arm: str, subject_id: str) -> str | None:
    """The arm's out-of-fold prediction of ``subject_id`` (whichever fold held it out), or None."""
    found = glob.glob(os.path.join(workdir, arm, "fold*", "predictions", f"{subject_id}.nii.gz"))
    return found[0] if found else None


def save_overlays(data: str, workdir: str, arms: list[str], out_dir: str) -> list[str]:
    """``<out_dir>/<case>.png`` for every case of ``data`` that each arm predicted; the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for subject in discover(data):
        paths = {arm: prediction_path(workdir, arm, subject.subject_id) for arm in arms}
        if not all(paths.values()):
            continue
        loaded = load_subject(subject, with_label=True)
        flair = np.asarray(loaded.images[3], np.float32)
        z = tumour_slice(loaded.label, flair.shape[2])
        panels = [("FLAIR", overlay(flair[:, :, z], None)), ("expert label", overlay(flair[:, :, z],
                                                                                   loaded.label[:, :, z]))]
        panels += [(arm, overlay(flair[:, :, z], read_nifti(path)[0][:, :, z])) for arm, path in paths.items()]
        path = os.path.join(out_dir, f"{subject.subject_id}.png")
        save_panels(path, panels, f"{subject.subject_id}, axial slice {z}")
        written.append(path)
    return written
