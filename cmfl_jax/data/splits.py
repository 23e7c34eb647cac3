"""Train/validation split of subjects: k folds fixed by a seed, independent of the order on disk."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from cmfl_jax.errors import CMFLError

T = TypeVar("T")


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
        raise CMFLError("config.val.fold", f"must lie in [0, {folds - 1}] for {folds} folds, got {fold}")
    if len(entries) < 2:
        raise CMFLError("config.val.folds", f"{len(entries)} subject(s) cannot be split into train and "
                                            "validation; set config.val.folds=0 to train on all")
    assignment = fold_of([key(e) for e in entries], folds, seed)
    train = [e for e in entries if assignment[key(e)] != fold]
    val = [e for e in entries if assignment[key(e)] == fold]
    if not val:
        raise CMFLError("config.val.folds", f"fold {fold} of {folds} is empty with {len(entries)} subjects")
    return train, val
