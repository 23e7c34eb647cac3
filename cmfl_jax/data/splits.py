"""The train/validation split of the subjects, one setting for every phase (``config.data.split``).

``folds``, ``fold``, ``seed``: k folds fixed by a seed, independent of the order on disk; fold ``fold`` is
CMFF's validation fold, CMFT trains on the other folds only, the demo predicts and scores it. ``folds`` <= 1:
no validation fold, every subject trains (the paper's way). ``file``: a ``split.json`` (written by the
``split`` job, ``configs/split.py``, or by the demo): its ids are used as they are and the other three
settings are ignored. :func:`write_split` writes ``split.json`` and the same split as two explicit-layout
CSVs (``train.csv``, ``validation.csv``: a data root each).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from cmfl_jax.data.csv_layout import write_subject_csv
from cmfl_jax.data.io import atomic_path
from cmfl_jax.data.subject import Subject
from cmfl_jax.errors import CMFLError

T = TypeVar("T")
SPLIT_FILE, TRAIN_CSV, VALIDATION_CSV = "split.json", "train.csv", "validation.csv"
KEY = "config.data.split"


def fold_of(subject_ids: Sequence[str], folds: int, seed: int) -> dict[str, int]:
    """Fold number of every subject: a seeded permutation of the sorted ids, dealt round-robin."""
    ids = sorted(subject_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[j]: rank % folds for rank, j in enumerate(order)}


def split_subjects(entries: Sequence[T], folds: int, fold: int, seed: int, key=lambda e: e.subject_id
                   ) -> tuple[list[T], list[T]]:
    """(train, validation): validation is fold ``fold`` of ``folds``; ``folds`` <= 1 means no validation.

    Raises:
      CMFLError: ``fold`` out of range, or a split that leaves no training subject.
    """
    if folds <= 1:
        return list(entries), []
    if not 0 <= fold < folds:
        raise CMFLError(f"{KEY}.fold", f"must lie in [0, {folds - 1}] for {folds} folds, got {fold}")
    if len(entries) < 2:
        raise CMFLError(f"{KEY}.folds", f"{len(entries)} subject(s) cannot be split into train and "
                                        f"validation; set {KEY}.folds=0 to train on all")
    assignment = fold_of([key(e) for e in entries], folds, seed)
    train = [e for e in entries if assignment[key(e)] != fold]
    val = [e for e in entries if assignment[key(e)] == fold]
    if not val:
        raise CMFLError(f"{KEY}.folds", f"fold {fold} of {folds} is empty with {len(entries)} subjects")
    return train, val


def read_split_file(path: str) -> dict[str, Any]:
    """A ``split.json``: ``{"root", "folds", "fold", "seed", "train": [ids], "validation": [ids]}``, checked.

    Raises:
      CMFLError (naming the file): unreadable, not JSON, ``train``/``validation`` missing or not lists of
        ids, an id listed twice or in both, no training subject.
    """
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CMFLError(path, f"cannot read the split file ({e}); write one with configs/split.py") from e
    if not isinstance(record, dict):
        raise CMFLError(path, "malformed split file: expected a JSON object with 'train' and 'validation'")
    for part in ("train", "validation"):
        ids = record.get(part)
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise CMFLError(path, f"malformed split file: {part!r} must be a list of subject ids")
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise CMFLError(path, f"malformed split file: subject {twice} is listed twice in {part!r}")
    both = sorted(set(record["train"]) & set(record["validation"]))
    if both:
        raise CMFLError(path, f"malformed split file: subject {both[0]} is in both 'train' and 'validation'")
    if not record["train"]:
        raise CMFLError(path, "malformed split file: 'train' is empty")
    for setting in ("folds", "fold", "seed"):
        if not isinstance(record.get(setting, 0), int):
            raise CMFLError(path, f"malformed split file: {setting!r} must be an integer")
    return record


def split_settings(split: Mapping) -> dict[str, int]:
    """``{"folds", "fold", "seed"}`` of ``config.data.split``, or of its ``file`` when one is set."""
    source = read_split_file(split["file"]) if split["file"] else split
    return {k: int(source.get(k, -1)) for k in ("folds", "fold", "seed")}


def apply_split(entries: Sequence[T], split: Mapping, root: str = "", key: Callable[[T], str] = lambda e: e.subject_id
                ) -> tuple[list[T], list[T]]:
    """(train, validation) subjects of ``entries`` (all of a data root) under ``config.data.split``.

    Without ``split.file``, :func:`split_subjects` by folds, fold and seed. With it, exactly the file's ids (in
    the order of ``entries``; subjects of the root the file does not list are left out).

    Raises:
      CMFLError: a bad fold setting, a malformed split file, or an id of the file that ``root`` lacks.
    """
    if not split["file"]:
        return split_subjects(entries, split["folds"], split["fold"], split["seed"], key)
    path = split["file"]
    record = read_split_file(path)
    present = {key(e) for e in entries}
    for part in ("train", "validation"):
        missing = [i for i in record[part] if i not in present]
        if missing:
            raise CMFLError(path, f"subject {missing[0]} of {part!r} ({len(missing)} of its {len(record[part])} "
                                  f"ids) is not in the data root {root or '(this root)'}; is config.data.root the "
                                  f"root the split was written for ({record.get('root', '?')})?")
    wanted = {i: part for part in ("train", "validation") for i in record[part]}
    return ([e for e in entries if wanted.get(key(e)) == "train"],
            [e for e in entries if wanted.get(key(e)) == "validation"])


def write_split(workdir: str, root: str, settings: Mapping, train: Sequence[Subject], validation: Sequence[Subject]
                ) -> dict[str, str]:
    """``<workdir>/split.json`` (``root``, the settings and both lists of ids, sorted), ``train.csv`` and
    ``validation.csv`` (the explicit layout: a data root of each part), each written atomically, split.json last.

    Returns the three paths (keys ``split``, ``train``, ``validation``).
    """
    os.makedirs(workdir, exist_ok=True)
    paths = {"split": os.path.join(workdir, SPLIT_FILE), "train": os.path.join(workdir, TRAIN_CSV),
             "validation": os.path.join(workdir, VALIDATION_CSV)}
    write_subject_csv(paths["train"], list(train))
    write_subject_csv(paths["validation"], list(validation))
    record = {"root": os.path.abspath(root), **{k: int(settings[k]) for k in ("folds", "fold", "seed")},
              "train": sorted(s.subject_id for s in train), "validation": sorted(s.subject_id for s in validation)}
    with atomic_path(paths["split"]) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return paths
