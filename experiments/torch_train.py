"""The PyTorch/MONAI peer of the real-data comparison: the torch U-Net twin trained and scored on one fold.

  python -m experiments.torch_train --config configs/cmff.py:cpu --split FOLD/split.json --seconds 1800 --out DIR
  (``--steps N`` in place of ``--seconds S``; ``--config.KEY=VALUE`` overrides, as the project's CLI takes them)

What a MONAI user would train, fed what the JAX method is fed, so that only the method differs: the training patches
come from the project's own pipeline (:func:`cmfl_jax.data.pipeline.patch_dataset` over the cached z-scored volumes,
with the config's seed, patch size, ``tumour_prob``, augmentation and ``train.batch_size``: the JAX run's patch stream
on one device); the network is :class:`experiments.torch_unet.TorchUNet3D` (``model.base``/``depth``, the 4
modalities in the project's order, one output per class of the data's label set); the loss MONAI's ``DiceCELoss``
(softmax, one-hot targets, its default 1:1 weights); Adam at ``cmff.lr`` (``b1``, ``b2``), no decay. The budget is a
number of steps or of seconds of training wall time (cache preparation and inference excluded), stopped at the first
step boundary past it. Then every ``validation`` subject of the split is predicted whole over its brain crop (the
cache's grid) by MONAI's ``sliding_window_inference`` (window = patch, ``val.overlap``, ``val.batch_size`` windows per
call, MONAI's default ``"constant"`` weighting) of the softmax; the argmax, background outside the brain's non-zero
voxels as predict makes it, is put back on the raw grid (:func:`cmfl_jax.data.cached_subject.uncrop`) and written
as ``configs/predict.py`` writes a subject (raw affine and header, the release's label values), without
post-processing, so ``configs/evaluate.py`` scores both peers the same way. ``DIR/torch_record.json`` (written
last) keeps the arguments, the steps, the seconds; a re-run with the same arguments and every prediction present
does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ml_collections
import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss

from cmfl_jax.config_variants import load_config
from cmfl_jax.data.cached_subject import CachedSubject, uncrop
from cmfl_jax.data.dataset import cache_subjects, split_of
from cmfl_jax.data.io import atomic_path, read_json, write_nifti
from cmfl_jax.data.pipeline import patch_dataset
from cmfl_jax.data.splits import read_split_file
from cmfl_jax.data.subject import Subject
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.sliding_window import restrict_to_brain
from cmfl_jax.jobs.predict import _label_header
from cmfl_jax.label_classes import classes_to_labels, labels_to_classes
from cmfl_jax.label_sets import LabelSet, label_set_of_subjects, to_dataset
from experiments.torch_unet import TorchUNet3D

RECORD = "torch_record.json"
PREDICTIONS = "predictions"


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> TorchUNet3D:
    """The twin at the config's sizes: 4 input channels (T1, T1ce, T2, FLAIR), one output per class."""
    torch.manual_seed(int(config.seed))
    return TorchUNet3D(in_channels=4, out_channels=num_classes, base=int(config.model.base),
                       depth=int(config.model.depth))


def _to_torch(image) -> torch.Tensor:
    """A channels-last ``(N, D, H, W, 4)`` array (float16 as cached, or float32) as float32 ``(N, 4, D, H, W)``."""
    return torch.from_numpy(np.asarray(image, np.float32)).permute(0, 4, 1, 2, 3).contiguous()


def train(model: TorchUNet3D, config: ml_collections.ConfigDict, entries: list[CachedSubject],
          classes: tuple[int, ...], steps: int | None = None, seconds: float | None = None) -> dict:
    """Train ``model`` in place on patches of ``entries`` until ``steps`` steps or the first step past ``seconds``
    of wall time (the patch reads included); returns the steps done, the seconds (``data_s``: the patch reads
    share) and each step's seconds."""
    if steps is None and seconds is None:
        raise CMFLError(None, "give a budget: --steps or --seconds")
    d = config.data
    stream = iter(patch_dataset(entries, d.patch_size, seed=int(config.seed), batch_size=int(config.train.batch_size),
                                tumour_prob=float(d.tumour_prob), flip=bool(d.flip), num_workers=int(d.num_workers),
                                augment=d.augment))
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config.cmff.lr),
                                 betas=(float(config.cmff.b1), float(config.cmff.b2)))
    model.train()
    step_s, losses, data_s, start = [], [], 0.0, time.perf_counter()
    while (steps is None or len(step_s) < steps) and (seconds is None or time.perf_counter() - start < seconds):
        t0 = time.perf_counter()
        batch = next(stream)
        data_s += time.perf_counter() - t0
        target = torch.from_numpy(labels_to_classes(np.asarray(batch["label"]), classes)).unsqueeze(1)  # (N, 1, ...)
        loss = loss_fn(model(_to_torch(batch["image"])), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        step_s.append(time.perf_counter() - t0)
    return {"steps": len(step_s), "train_s": time.perf_counter() - start, "data_s": data_s,
            "step_s": [round(s, 4) for s in step_s],
            "mean_step_s_after_first": float(np.mean(step_s[1:])) if len(step_s) > 1 else None,
            "final_loss": losses[-1] if losses else None}


def predict_volume(model: TorchUNet3D, config: ml_collections.ConfigDict, entry: CachedSubject,
                   classes: tuple[int, ...]) -> np.ndarray:
    """Internal label map of ``entry`` on its full (raw) grid: MONAI's window over the brain crop, argmax, the brain
    kept, uncropped."""
    model.eval()
    image = np.asarray(entry.image())
    with torch.inference_mode():
        probs = sliding_window_inference(
            _to_torch(image[None]), roi_size=tuple(int(p) for p in config.data.patch_size),
            sw_batch_size=int(config.val.batch_size), predictor=lambda w: torch.softmax(model(w), dim=1),
            overlap=float(config.val.overlap), mode="constant")
    # background outside the brain inside the crop too, as the predict job does (restrict_to_brain)
    return uncrop(restrict_to_brain(classes_to_labels(probs[0].argmax(dim=0).numpy(), classes), image), entry)


def write_prediction(path: str, internal: np.ndarray, subject: Subject) -> None:
    """The label map in the release's values, with the raw files' affine and header (as the predict job writes)."""
    raw = nib.load(subject.images[0])  # the header only; the voxels are not read
    write_nifti(path, to_dataset(internal, subject.labels), np.asarray(raw.affine, np.float64),
                _label_header(raw.header))


def predict_subjects(model: TorchUNet3D, config: ml_collections.ConfigDict, subjects: list[Subject],
                     entries: list[CachedSubject], classes: tuple[int, ...], out_dir: str) -> dict[str, float]:
    """Write ``<out_dir>/<subject_id>.nii.gz`` for each subject (its cache entry beside it); seconds per subject."""
    os.makedirs(out_dir, exist_ok=True)
    seconds = {}
    for subject, entry in zip(subjects, entries, strict=True):
        start = time.perf_counter()
        write_prediction(os.path.join(out_dir, f"{subject.subject_id}.nii.gz"),
                         predict_volume(model, config, entry, classes), subject)
        seconds[subject.subject_id] = time.perf_counter() - start
    return seconds


def fold_label_set(config: ml_collections.ConfigDict, entries: list[CachedSubject]) -> LabelSet:
    """The label set whose classes the head predicts, resolved from the data as the cmff job does."""
    return label_set_of_subjects([e.meta.get("label_set", "brats2021") for e in entries],
                                 config.model.get("label_set", ""))


def run_key(config: ml_collections.ConfigDict, split: dict, steps: int | None, seconds: float | None) -> dict:
    """What decides the outputs: the config, the split's ids and the budget (compared as JSON on a re-run)."""
    return json.loads(json.dumps({"config": json.loads(config.to_json_best_effort()),
                                  "train": sorted(split["train"]), "validation": sorted(split["validation"]),
                                  "steps": steps, "seconds": seconds}))


def _finished(out_dir: str, key: dict) -> dict | None:
    record = read_json(os.path.join(out_dir, RECORD))
    if record is None or record.get("key") != key:
        return None
    done = all(os.path.isfile(os.path.join(out_dir, PREDICTIONS, f"{i}.nii.gz")) for i in key["validation"])
    return record if done else None


def run(config: ml_collections.ConfigDict, split_file: str, out_dir: str, steps: int | None = None,
        seconds: float | None = None) -> dict:
    """Train the twin on the split's ``train`` ids, predict its ``validation`` ids into ``out_dir/predictions``;
    returns (and writes last) the record. A finished run with the same key is returned as it is."""
    if (steps is None) == (seconds is None):
        raise CMFLError(None, "give exactly one budget: --steps N or --seconds S")
    config = ml_collections.ConfigDict(config.to_dict())  # a copy: the split file goes in below
    config.data.split.file = os.path.abspath(split_file)
    key = run_key(config, read_split_file(split_file), steps, seconds)
    record = _finished(out_dir, key)
    if record is not None:
        print(f"torch_train: {out_dir} already holds this run's predictions, skipped", flush=True)
        return record
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    train_subjects, val_subjects = split_of(config.data)
    start = time.perf_counter()
    entries = cache_subjects(config.data, train_subjects + val_subjects)
    cache_s = time.perf_counter() - start
    train_entries, val_entries = entries[: len(train_subjects)], entries[len(train_subjects):]
    labels = fold_label_set(config, entries)
    model = build_model(config, labels.num_classes)
    trained = train(model, config, train_entries, labels.classes, steps, seconds)
    print(f"torch_train: {trained['steps']} steps in {trained['train_s']:.1f} s, loss {trained['final_loss']}",
          flush=True)
    predict_s = predict_subjects(model, config, val_subjects, val_entries, labels.classes,
                                 os.path.join(out_dir, PREDICTIONS))
    record = {"key": key, "label_set": labels.name, "threads": threads, "torch": torch.__version__,
              "cache_s": cache_s, **trained, "predict_s": predict_s}
    with atomic_path(os.path.join(out_dir, RECORD)) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    return record


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """The arguments and the config (``--config`` with its variants, then each ``--config.KEY=VALUE``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="e.g. configs/cmff.py:cpu[,variant|key=value...]")
    parser.add_argument("--split", required=True, help="a split.json (configs/split.py, configs/cv.py)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="training steps")
    budget.add_argument("--seconds", type=float, help="training wall time: stop at the first step past it")
    parser.add_argument("--out", required=True, help="output folder (predictions/, torch_record.json)")
    argv = sys.argv[1:] if argv is None else list(argv)
    parts = [a.removeprefix("--config.") for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if any("=" not in part for part in parts):
        parser.error("config overrides are --config.KEY=VALUE (one argument)")
    spec = ",".join([args.config, *parts]) if ":" in args.config else f"{args.config}:{','.join(parts)}"
    try:
        config = load_config(spec)  # the variants, then each override as a key=value part
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        parser.error(f"--config {spec}: {e}")
    return args, config


def main(argv: list[str] | None = None) -> int:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain reads absl flags; this script has none of its own
    args, config = parse_args(argv)
    try:
        record = run(config, args.split, args.out, args.steps, args.seconds)
    except CMFLError as e:
        print(f"torch_train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: record[k] for k in ("steps", "train_s", "mean_step_s_after_first", "predict_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
