"""Full-volume prediction to NIfTI from a CMFF workdir (``configs/predict.py``).

The model is rebuilt from the workdir's ``config.json`` (what the CMFF run was trained with) and
its params restored from ``best/``, ``final/`` or ``checkpoints/`` (no optimizer state). Each
subject is read and checked as in training, z-scored, predicted whole by sliding windows
(:func:`cmfl_jax.inference.sliding_window`), set to background outside the brain, and written as
``<subject_id>.nii.gz`` with the input's affine and header in the dataset's own label convention
(ET = 4, or 3 for BraTS 2023+), atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
from absl import logging

from cmfl_jax import checkpoints
from cmfl_jax.classes import classes_to_labels
from cmfl_jax.data.dataset import resolve_root
from cmfl_jax.data.io import LoadedSubject, load_subject, write_nifti
from cmfl_jax.data.layouts import Subject, discover, to_dataset
from cmfl_jax.data.preprocess import preprocess_images
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference import cmff_predict_fn, restrict_to_brain, sliding_window
from cmfl_jax.previews import save_orthogonal_png
from cmfl_jax.progress import progress

# config.checkpoint -> the CMFF workdir's sub-folder.
CHECKPOINT_DIRS = {"best": "best", "final": "final", "latest": "checkpoints"}


@dataclasses.dataclass
class Predictor:
    """A trained CMFFNet and what prediction needs to know about its training."""

    model: object
    params: dict
    pairing: str
    window: tuple[int, int, int]
    normalization: str
    source: str

    def probabilities(self, image: np.ndarray, overlap: float = 0.5, batch_size: int = 1, mirror: bool = False,
                      window: tuple[int, ...] | None = None) -> np.ndarray:
        """Class probabilities ``(D, H, W, 4)`` of a pre-processed ``(D, H, W, 4)`` volume."""
        fn = _predict_fn(self.model, self.pairing, mirror)
        return sliding_window(functools.partial(fn, self.params), image, window or self.window, overlap, batch_size)


@functools.lru_cache(maxsize=8)
def _predict_fn(model, pairing: str, mirror: bool):
    return cmff_predict_fn(model, pairing, mirror)  # one jitted function (one compilation) per model and setting


def _read_run_config(model_dir: str) -> ml_collections.ConfigDict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise CMFLError(model_dir, "model directory (config.model_dir) does not exist")
    if not os.path.isfile(path):
        raise CMFLError(path, "file not found: config.model_dir must be the workdir of a CMFF run (configs/cmff.py)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.get("job") != "cmff":
        raise CMFLError(path, f"this is a {config.get('job')!r} run, not a CMFF run (configs/cmff.py)")
    return config


def load_workdir(model_dir: str, checkpoint: str = "best") -> Predictor:
    """The predictor of a CMFF workdir's ``best``, ``final`` or ``latest`` checkpoint (params only)."""
    from cmfl_jax.train_cmff import build_model  # the one definition of the model a config describes

    if checkpoint not in CHECKPOINT_DIRS:
        raise CMFLError("config.checkpoint", f"unknown value {checkpoint!r}; "
                                             f"choose one of {', '.join(CHECKPOINT_DIRS)}")
    run_config = _read_run_config(model_dir)
    model = build_model(run_config)
    size = 2**model.depth
    x = jnp.zeros((1, size, size, size, 2), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x, x)["params"]
    subdir = CHECKPOINT_DIRS[checkpoint]
    step = checkpoints.latest_step(model_dir, subdir)
    if step is None:
        raise CMFLError(os.path.join(model_dir, subdir), f"no {checkpoint} checkpoint in this CMFF workdir")
    manager = checkpoints.make_manager(model_dir, None, subdir, read_only=True)
    try:
        restored, _ = checkpoints.restore(manager, {"seg": {"params": abstract}}, step=step, partial=True)
    finally:
        manager.close()
    params = restored["seg"]["params"]
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params)):
        raise CMFLError(os.path.join(manager.directory, str(step)), "checkpoint does not match the model of its "
                                                                    "config.json (another architecture?)")
    source = os.path.join(os.path.abspath(model_dir), subdir, str(step))
    logging.info("predict: model from %s (%s, attention %s, base %d, depth %d)", source, run_config.model.branches,
                 run_config.model.attention, run_config.model.base, run_config.model.depth)
    return Predictor(model, params, run_config.data.pairing, tuple(int(p) for p in run_config.data.patch_size),
                     run_config.data.normalization, source)


def model_input(predictor: Predictor, loaded: LoadedSubject) -> np.ndarray:
    """The pre-processed ``(D, H, W, 4)`` volume the model takes, normalised as in its training."""
    return np.moveaxis(preprocess_images(loaded.images, predictor.normalization), 0, -1)


def predict_image(predictor: Predictor, image: np.ndarray, overlap: float = 0.5, batch_size: int = 1,
                  mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(internal 0/1/2/4 label map, class probabilities) of a pre-processed volume."""
    probs = predictor.probabilities(image, overlap, batch_size, mirror)
    return restrict_to_brain(classes_to_labels(np.argmax(probs, axis=-1)), image), probs


def _label_header(header: nib.Nifti1Header) -> nib.Nifti1Header:
    """The input's header for a label map: its geometry, no intensity scaling."""
    header = header.copy()
    header.set_slope_inter(1.0, 0.0)
    return header


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if not config.model_dir:
        raise CMFLError("config.model_dir", "is empty: give the workdir of a CMFF run (configs/cmff.py) or a bundle "
                                            "(configs/export.py)")
    from cmfl_jax.export import is_bundle, load_bundle  # export builds on this module

    subjects: list[Subject] = discover(resolve_root(config.data), require_labels=False)  # before the model: cheap
    if is_bundle(config.model_dir):
        predictor = load_bundle(config.model_dir)
    else:
        predictor = load_workdir(config.model_dir, config.checkpoint)
    out_dir = config.out_dir or os.path.join(workdir, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    for subject in progress(subjects, desc="predict: subject"):
        start = time.perf_counter()
        loaded = load_subject(subject, with_label=bool(config.overlays))  # the label only to draw it
        image = model_input(predictor, loaded)
        pred, probs = predict_image(predictor, image, config.overlap, config.batch_size, config.mirror)
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
