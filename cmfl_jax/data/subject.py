"""One subject on disk and the label conventions, whatever layout named its files."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from cmfl_jax.errors import CMFLError

# Channel order used everywhere inside the package: pair A = (t1, t1ce), pair B = (t2, flair).
MODALITIES = ("t1", "t1ce", "t2", "flair")
INTERNAL_LABELS = (0, 1, 2, 4)


@dataclasses.dataclass(frozen=True)
class Subject:
    """One subject on disk.

    Attributes:
      subject_id: the dataset's own id (folder name in the BraTS releases).
      layout: release the names come from (``brats2018``, ``brats2023``, ``csv``, ...).
      images: paths of T1, T1c, T2 and FLAIR, in :data:`MODALITIES` order.
      label: path of the label map, or None for unlabelled (validation/test) data.
      et_label: the value the dataset uses for enhancing tumour (4, or 3 for 2023+).
      grade: ``HGG``/``LGG`` when the folder tree says so, else None.
    """

    subject_id: str
    layout: str
    images: tuple[str, str, str, str]
    label: str | None
    et_label: int = 4
    grade: str | None = None

    @property
    def folder(self) -> str:
        return os.path.dirname(self.images[0])


def _relabel(label: np.ndarray, old: int, new: int) -> np.ndarray:
    out = np.asarray(label).astype(np.uint8)  # a copy: the caller's array is never changed
    out[out == old] = new
    return out


def to_internal(label: np.ndarray, et_label: int) -> np.ndarray:
    """Map a dataset label map to the internal 0/1/2/4 convention (uint8)."""
    return _relabel(label, et_label, 4)


def to_dataset(label: np.ndarray, et_label: int) -> np.ndarray:
    """Map an internal 0/1/2/4 label map back to the dataset's convention (uint8)."""
    return _relabel(label, 4, et_label)


def allowed_labels(et_label: int) -> tuple[int, ...]:
    """Label values a dataset with this enhancing-tumour value may contain."""
    return (0, 1, 2, et_label)


def check_unique_ids(root: str, subjects: list[Subject]) -> None:
    seen: dict[str, str] = {}
    for s in subjects:
        if s.subject_id in seen:
            raise CMFLError(root, f"subject id {s.subject_id} appears twice ({seen[s.subject_id]} and {s.folder})")
        seen[s.subject_id] = s.folder
