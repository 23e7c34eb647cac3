"""The ``predict`` job (``configs/predict.py``): full-volume prediction to NIfTI from a CMFF workdir or bundle.

The subjects are every subject found under ``config.data.root``, or the one case of ``config.case`` (four files,
T1, T1c, T2, FLAIR; no folder tree or CSV). The predictor (:mod:`cmfl_jax.inference.predictor`) is the model of
the run's ``config.json`` with the params of ``best/``, ``final/``, ``checkpoints/`` or a bundle; with
``config.use_stablehlo`` it is the bundle's exported StableHLO function (:mod:`cmfl_jax.inference.stablehlo`),
and this path imports no model code. Each subject is read and checked as in training, z-scored, predicted whole
by sliding windows (:func:`cmfl_jax.inference.sliding_window`), set to background outside the brain, and written
as ``<subject_id>.nii.gz`` with the input's affine and header in the dataset's own label convention (its label
set's values, :mod:`cmfl_jax.label_sets`: ET = 4 for 2017-2021, 3 for 2023+, RC = 4 for 2024 GLI post-treatment,
the 2024 PED values), atomically. With ``config.data.label_set=auto`` the model's label set replaces a subject's
when it extends it (a brats2024_gli model on ``BraTS-GLI-*`` names); a subject whose set has other classes than
the model's is a one-line error. Several models (``config.model_dir`` a comma-separated list, or a CV workdir for its
folds' CMFF runs) predict as one ensemble: the mean of their probabilities (:mod:`cmfl_jax.inference.ensemble`),
post-processed with the CV run's threshold (its folds' median). A re-run skips the subjects whose outputs are all there,
newer than the model and the images, and made with the same model and settings (``<out_dir>_record.json``, beside
the outputs' folder so that it holds NIfTI files only, as a BraTS submission does, keeps them per subject);
``overwrite`` redoes them all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import ml_collections
import nibabel as nib
import numpy as np
from absl import logging

from cmfl_jax.data.dataset import resolve_root
from cmfl_jax.data.io import atomic_path, load_subject, read_json, write_nifti
from cmfl_jax.data.layouts import MODALITIES, Subject, discover, to_dataset
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.ensemble import EnsemblePredictor, model_dirs
from cmfl_jax.inference.sliding_window import choose_window
from cmfl_jax.inference.stablehlo import BUNDLE_FILE, load_stablehlo_predictor, read_bundle_info
from cmfl_jax.label_sets import AUTO, KEY, LABEL_SETS, LEGACY, LabelSet, check_choice, extends, of_et_label
from cmfl_jax.postprocess import postprocess, resolve_et_threshold
from cmfl_jax.previews import save_orthogonal_png
from cmfl_jax.progress import progress


def _label_header(header: nib.Nifti1Header) -> nib.Nifti1Header:
    """The input's header for a label map: its geometry, no intensity scaling."""
    header = header.copy()
    header.set_slope_inter(1.0, 0.0)
    return header


def case_subject(case: str, case_id: str = "", et_label: int = 4, label_set: str = AUTO) -> Subject:
    """The one :class:`Subject` of ``config.case``: ``"t1,t1ce,t2,flair"`` file paths (layout ``case``, no label),
    of ``label_set`` (``auto``: the set of its ``et_label``, 4 or 3).

    ``case_id`` defaults to the T1 file's name without ``.nii[.gz]`` and a trailing ``_t1``/``-t1n``-like suffix.
    """
    files = [f.strip() for f in case.split(",")]
    if len(files) != len(MODALITIES) or not all(files):
        raise CMFLError("config.case", f"expected {len(MODALITIES)} comma-separated files "
                                       f"({','.join(MODALITIES)}), got {len([f for f in files if f])}")
    for path in files:
        if not os.path.isfile(path):
            raise CMFLError(path, "file not found (config.case)")
    if not case_id:
        name = re.sub(r"\.nii(\.gz)?$", "", os.path.basename(files[0]))
        case_id = re.sub(r"[_\-.](t1|t1n|t1w)$", "", name, flags=re.IGNORECASE) or name
    name = of_et_label(et_label).name if check_choice(label_set) == AUTO else label_set
    return Subject(case_id, "case", tuple(files), None, name)


def _subjects(config: ml_collections.ConfigDict) -> list[Subject]:
    label_set = config.data.get("label_set", AUTO)
    if config.case:
        return [case_subject(config.case, config.case_id, config.et_label, label_set)]
    return discover(resolve_root(config.data), require_labels=False, label_set=label_set)


def fit_label_sets(subjects: list[Subject], model: LabelSet, label_set: str = AUTO) -> list[Subject]:
    """The subjects, each in a label set of the model's classes: under ``auto`` the model's set replaces one it
    extends (and a case's, unless the model has the classic classes, where ``config.et_label`` decides)."""
    if label_set == AUTO:
        legacy = model.classes == LABEL_SETS[LEGACY].classes
        subjects = [dataclasses.replace(s, label_set=model.name)
                    if extends(model.name, s.label_set) or (s.layout == "case" and not legacy) else s
                    for s in subjects]
    for s in subjects:
        if s.labels.classes != model.classes:
            raise CMFLError(KEY, f"subject {s.subject_id} is {s.label_set}, but the model predicts the classes of "
                                 f"{model.name}; set {KEY} to the data's release")
    return subjects


def _load_one(config: ml_collections.ConfigDict, model_dir: str):
    if config.use_stablehlo:
        if not os.path.isfile(os.path.join(model_dir, BUNDLE_FILE)):
            raise CMFLError(model_dir, f"config.use_stablehlo needs a bundle (configs/export.py) as "
                                       f"config.model_dir; this has no {BUNDLE_FILE}")
        return load_stablehlo_predictor(model_dir)
    from cmfl_jax.inference.predictor import load_predictor  # here only: the StableHLO path builds no Flax model

    return load_predictor(model_dir, config.checkpoint)


def _load_predictor(config: ml_collections.ConfigDict, dirs: list[str]):
    """The one model's predictor, or the ensemble of several (:mod:`cmfl_jax.inference.ensemble`)."""
    if len(dirs) == 1:
        return _load_one(config, dirs[0])
    logging.info("predict: an ensemble of %d models, their probabilities averaged", len(dirs))
    return EnsemblePredictor([_load_one(config, d) for d in dirs])


def _tuned_et_threshold(config: ml_collections.ConfigDict, dirs: list[str], cv: dict | None) -> float | None:
    """The ET threshold tuned for these models: a CV run's (the median of its folds' own); else the one
    model's CMFF validation's (bundle.json or the checkpoint's meta); none for an ensemble of other models."""
    if cv is not None:
        return (cv.get("postprocess") or {}).get("et_min_mm3")
    if len(dirs) > 1:
        return None
    if os.path.isfile(os.path.join(dirs[0], BUNDLE_FILE)):
        return (read_bundle_info(dirs[0]).get("postprocess") or {}).get("et_min_mm3")
    from cmfl_jax import checkpoints
    from cmfl_jax.inference.predictor import CHECKPOINT_DIRS

    meta = checkpoints.latest_meta(dirs[0], CHECKPOINT_DIRS.get(config.checkpoint, "best")) or {}
    return (meta.get("postprocess") or {}).get("et_min_mm3")


def _window(config: ml_collections.ConfigDict, predictor, shape) -> tuple[int, ...] | None:
    """``config.window`` for a volume of ``shape`` (None: the training patch of each model)."""
    if not config.get("window", ""):
        return None
    if not hasattr(predictor, "multiple"):
        raise CMFLError("config.window", "needs the Flax model: the StableHLO function takes its exported window only")
    return choose_window(config.window, (), shape, predictor.multiple)


def _outputs(out_dir: str, subject: Subject, probabilities: bool) -> list[str]:
    names = [f"{subject.subject_id}.nii.gz"] + ([f"{subject.subject_id}_probabilities.nii.gz"] if probabilities else [])
    return [os.path.join(out_dir, n) for n in names]


def _mtime(path: str) -> float:
    """Newest modification time of ``path`` and, for a folder, of the entries directly in it."""
    times = [os.path.getmtime(path)]
    if os.path.isdir(path):
        times += [e.stat().st_mtime for e in os.scandir(path)]
    return max(times)


def _record_path(out_dir: str) -> str:
    """Beside the outputs' folder: the model and settings each subject was predicted with."""
    return os.path.abspath(out_dir).rstrip(os.sep) + "_record.json"


def _settings(config: ml_collections.ConfigDict, dirs: list[str], et_min: float, wt_min: float) -> dict:
    """What decides a subject's outputs: the models, the checkpoint, and every setting that changes the labels."""
    return {"models": [os.path.abspath(d) for d in dirs], "checkpoint": config.checkpoint,
            "use_stablehlo": bool(config.use_stablehlo), "overlap": float(config.overlap),
            "window": str(config.get("window", "")), "mirror": bool(config.mirror),
            "et_min_mm3": float(et_min), "wt_min_mm3": float(wt_min),
            "save_probabilities": bool(config.save_probabilities)}


def _of(settings: dict, subject: Subject) -> dict:
    """A subject's settings: the run's, and the label set its values are written in (unless the classic one)."""
    return settings if subject.label_set in ("brats2021", "brats2023") else {**settings, "label_set": subject.label_set}


def _read_record(out_dir: str) -> dict:
    return read_json(_record_path(out_dir)) or {}  # none yet, or unreadable: every subject is redone


def _write_record(out_dir: str, record: dict) -> None:
    with atomic_path(_record_path(out_dir)) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)


def _up_to_date(outputs: list[str], subject: Subject, model_time: float, recorded: dict | None,
                settings: dict) -> bool:
    """Every output exists, is newer than the model and the subject's images (``make``'s rule), and was made with
    these models and settings."""
    if recorded != settings or not all(os.path.isfile(p) for p in outputs):
        return False
    return min(map(os.path.getmtime, outputs)) >= max(model_time, *map(os.path.getmtime, subject.images))


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    dirs, cv = model_dirs(config.model_dir)
    if cv is not None:  # a CV run's folds: the checkpoint its folds were scored with
        config.checkpoint = cv.get("checkpoint", config.checkpoint)
    subjects = _subjects(config)  # before the model: cheap
    predictor = _load_predictor(config, dirs)
    subjects = fit_label_sets(subjects, predictor.label_set, config.data.get("label_set", AUTO))
    out_dir = config.out_dir or os.path.join(workdir, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    tuned = _tuned_et_threshold(config, dirs, cv)
    et_min = resolve_et_threshold(config.postprocess.et_min_mm3, tuned)
    wt_min = float(config.postprocess.wt_min_mm3)
    how = ("config.postprocess" if config.postprocess.et_min_mm3 >= 0
           else "the default, no tuned value for these models" if tuned is None
           else "the median of the CV run's folds' own thresholds" if cv is not None
           else "tuned on the validation fold")
    logging.info("predict: post-processing: enhancing tumour under %g mm³ becomes NCR/NET (%s%s); whole-tumour "
                 "components under %g mm³ removed", et_min, "off: " if et_min == 0 else "", how, wt_min)
    model_time = max(_mtime(source) for source in getattr(predictor, "sources", [predictor.source]))
    settings, record = _settings(config, dirs, et_min, wt_min), _read_record(out_dir)
    todo = [s for s in subjects if config.overwrite or not _up_to_date(
        _outputs(out_dir, s, config.save_probabilities), s, model_time, record.get(s.subject_id), _of(settings, s))]
    if len(todo) < len(subjects):
        logging.info("predict: skipped %d of %d subject(s) already predicted in %s by this model with these settings "
                     "(config.overwrite=true redoes them)", len(subjects) - len(todo), len(subjects), out_dir)
    for subject in progress(todo, desc="predict: subject"):
        start = time.perf_counter()
        loaded = load_subject(subject, with_label=bool(config.overlays))  # the label only to draw it
        image = predictor.model_input(loaded)
        window = _window(config, predictor, image.shape[:3])
        pred, probs = predictor.labels(image, config.overlap, config.batch_size, config.mirror, window)
        pred = postprocess(pred, loaded.spacing, et_min, wt_min)
        header = _label_header(loaded.header)
        out = _outputs(out_dir, subject, config.save_probabilities)
        if config.save_probabilities:
            write_nifti(out[1], probs.astype(np.float32), loaded.affine, header)
        write_nifti(out[0], to_dataset(pred, subject.labels), loaded.affine, header)
        record[subject.subject_id] = _of(settings, subject)
        _write_record(out_dir, record)
        if config.overlays:
            save_orthogonal_png(os.path.join(workdir, "overlays", f"{subject.subject_id}.png"), image, pred,
                                loaded.label, title=subject.subject_id)
        logging.info("predict: %s in %.1f s", subject.subject_id, time.perf_counter() - start)
    logging.info("predict: %d subject(s) written to %s (%d skipped)", len(todo), out_dir, len(subjects) - len(todo))
