"""The explicit layout: a CSV listing each subject's files
(``subject_id,t1,t1ce,t2,flair[,seg][,et_label][,grade][,label_set]``).

``label_set`` names the subject's label set (:mod:`cmfl_jax.label_sets`); without it ``et_label`` 3 means
brats2023 and 4 (the default) brats2021.

A data root of any subset of subjects, wherever their files are: the demo and the split use it to hand each
phase exactly its subjects. Relative paths are relative to the CSV's folder.
"""

from __future__ import annotations

import csv
import io
import os

from cmfl_jax.data.io import atomic_path
from cmfl_jax.data.subject import MODALITIES, Subject, check_unique_ids
from cmfl_jax.errors import CMFLError
from cmfl_jax.label_sets import LABEL_SETS, of_et_label


def read_subject_csv(path: str, require_labels: bool) -> list[Subject]:
    """Explicit layout: one row per subject; relative paths are relative to the CSV's folder."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            columns = set(rows[0].keys()) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CMFLError(path, f"cannot read CSV ({e})") from e
    needed = {"subject_id", *MODALITIES}
    if not rows:
        raise CMFLError(path, "no subjects found: the CSV has no rows")
    if not needed <= columns:
        raise CMFLError(path, f"CSV lacks column(s) {', '.join(sorted(needed - columns))}")

    def resolve(p: str) -> str:
        return os.path.normpath(os.path.join(base, p.strip()))

    subjects = []
    for i, row in enumerate(rows, start=2):
        sid = (row["subject_id"] or "").strip()
        if not sid:
            raise CMFLError(path, f"line {i}: empty subject_id")
        empty = [m for m in MODALITIES if not (row[m] or "").strip()]
        if empty:
            raise CMFLError(path, f"line {i}: subject {sid} is missing modality {', '.join(empty)}")
        label = (row.get("seg") or "").strip() or None
        if require_labels and label is None:
            raise CMFLError(path, f"line {i}: subject {sid} has no label map (seg column)")
        set_name = (row.get("label_set") or "").strip()
        et_text = (row.get("et_label") or "4").strip()
        if not set_name and et_text not in ("3", "4"):
            raise CMFLError(path, f"line {i}: et_label must be 3 or 4, got {et_text!r}")
        set_name = set_name or of_et_label(int(et_text)).name
        if set_name not in LABEL_SETS:
            raise CMFLError(path, f"line {i}: unknown label_set {set_name!r}; choose one of {', '.join(LABEL_SETS)}")
        subjects.append(
            Subject(
                subject_id=sid,
                layout="csv",
                images=tuple(resolve(row[m]) for m in MODALITIES),  # type: ignore[arg-type]
                label=resolve(label) if label else None,
                label_set=set_name,
                grade=(row.get("grade") or "").strip().upper() or None,
            )
        )
    check_unique_ids(path, subjects)
    return subjects


def write_subject_csv(path: str, subjects: list[Subject]) -> None:
    """The explicit CSV layout (``cmfl_jax.data.layouts``) listing ``subjects``: a data root of just them."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["subject_id", *MODALITIES, "seg", "et_label", "grade", "label_set"])
    for s in subjects:
        writer.writerow([s.subject_id, *(os.path.abspath(p) for p in s.images),
                         os.path.abspath(s.label) if s.label else "", s.et_label, s.grade or "", s.label_set])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(buffer.getvalue())
