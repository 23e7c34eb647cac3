"""One PNG per held-out case of ``experiments/quality.py``: the axial slice with the most tumour, FLAIR, the expert
label and each arm's out-of-fold prediction over it (BraTS colours: NCR/NET, oedema, enhancing tumour)."""

from __future__ import annotations

import glob
import os

import numpy as np

from cmfl_jax.data.io import load_subject, read_nifti
from cmfl_jax.data.layouts import discover
from cmfl_jax.previews import new_figure, overlay, save_figure, tumour_slice


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
        plt, fig, axes = new_figure(1, len(panels), size=2.6)
        for ax, (name, rgb) in zip(axes[0], panels, strict=True):
            ax.imshow(rgb)
            ax.set_title(name, fontsize=8)
        fig.suptitle(f"{subject.subject_id}, axial slice {z}", fontsize=9)
        path = os.path.join(out_dir, f"{subject.subject_id}.png")
        save_figure(plt, fig, path)
        written.append(path)
    return written
