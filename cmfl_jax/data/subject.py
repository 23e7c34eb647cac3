"""One subject on disk and the label conventions, whatever layout named its files."""

from __future__ import annotations

import dataclasses
import os

from cmfl_jax.errors import CMFLError
from cmfl_jax.label_sets import LabelSet, as_label_set, to_dataset, to_internal  # noqa: F401 (re-exported)

# Channel order used everywhere inside the package: pair A = (t1, t1ce), pair B = (t2, flair).
MODALITIES = ("t1", "t1ce", "t2", "flair")
INTERNAL_LABELS = (0, 1, 2, 4)  # the classes of BraTS 2017-2023; other sets: cmfl_jax.label_sets


@dataclasses.dataclass(frozen=True)
class Subject:
    """One subject on disk.

    Attributes:
      subject_id: the dataset's own id (folder name in the BraTS releases).
      layout: release the names come from (``brats2018``, ``brats2023``, ``csv``, ...).
      images: paths of T1, T1c, T2 and FLAIR, in :data:`MODALITIES` order.
      label: path of the label map, or None for unlabelled (validation/test) data.
      label_set: the name of its label convention (:data:`cmfl_jax.label_sets.LABEL_SETS`).
      grade: ``HGG``/``LGG`` when the folder tree says so, else None.
    """

    subject_id: str
    layout: str
    images: tuple[str, str, str, str]
    label: str | None
    label_set: str = "brats2021"
    grade: str | None = None

    @property
    def folder(self) -> str:
        return os.path.dirname(self.images[0])

    @property
    def labels(self) -> LabelSet:
        """The subject's label set: its values, regions and classes."""
        return as_label_set(self.label_set)

    @property
    def et_label(self) -> int:
        """The value the dataset uses for enhancing tumour (4 for 2017-2021, 3 for 2023, 1 for PED 2024)."""
        return self.labels.et_label


def allowed_labels(convention: int | str | LabelSet) -> tuple[int, ...]:
    """Label values a dataset of this label set (or, the older API, enhancing-tumour value) may contain."""
    return as_label_set(convention).values


def check_unique_ids(root: str, subjects: list[Subject]) -> None:
    seen: dict[str, str] = {}
    for s in subjects:
        if s.subject_id in seen:
            raise CMFLError(root, f"subject id {s.subject_id} appears twice ({seen[s.subject_id]} and {s.folder})")
        seen[s.subject_id] = s.folder
