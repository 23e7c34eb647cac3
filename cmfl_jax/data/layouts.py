"""Discover BraTS subjects on disk from file names, and map label conventions.

Supported layouts (one folder per subject, found anywhere below the root):

* 2017/2018: ``Brats18_<id>_{t1,t1ce,t2,flair,seg}.nii.gz``, often under ``HGG/`` and ``LGG/``;
* 2019-2021: ``BraTS20_Training_001_{...}.nii.gz``, ``BraTS2021_00000_{...}.nii.gz``;
* 2023+: ``BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (enhancing tumour is label 3);
* explicit: a CSV file with columns ``subject_id,t1,t1ce,t2,flair[,seg][,et_label]``.

Inside the package labels always follow BraTS 2017/2018: 0 background, 1 NCR/NET,
2 oedema, 4 enhancing tumour. :func:`to_internal` and :func:`to_dataset` convert.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections import defaultdict

import numpy as np

from cmfl_jax.errors import CMFLError

# Channel order used everywhere inside the package: pair A = (t1, t1ce), pair B = (t2, flair).
MODALITIES = ("t1", "t1ce", "t2", "flair")
INTERNAL_LABELS = (0, 1, 2, 4)

# File-name suffix of each modality (and the label map) per naming family.
_SUFFIXES_CLASSIC = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}
_SUFFIXES_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}

_NII = r"\.nii(?:\.gz)?$"
_RE_CLASSIC = re.compile(r"^(?P<sid>.+?)_(?P<mod>t1|t1ce|t2|flair|seg)" + _NII)
_RE_2023 = re.compile(r"^(?P<sid>BraTS-[A-Za-z]+-\d+-\d+)-(?P<mod>t1n|t1c|t2w|t2f|seg)" + _NII)

# Which release a subject id comes from (classic naming family); the first match wins.
_RELEASE_PREFIXES = (
    ("Brats17_", "brats2017"),
    ("Brats18_", "brats2018"),
    ("BraTS19_", "brats2019"),
    ("BraTS20_", "brats2020"),
    ("BraTS2021_", "brats2021"),
)

# Layouts that :func:`subject_file_paths` can write (the phantom uses them).
WRITABLE_LAYOUTS = ("brats2018", "brats2021", "brats2023")


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


def to_internal(label: np.ndarray, et_label: int) -> np.ndarray:
    """Map a dataset label map to the internal 0/1/2/4 convention (uint8)."""
    label = np.asarray(label).astype(np.uint8)
    if et_label == 4:
        return label
    out = label.copy()
    out[label == et_label] = 4
    return out


def to_dataset(label: np.ndarray, et_label: int) -> np.ndarray:
    """Map an internal 0/1/2/4 label map back to the dataset's convention (uint8)."""
    label = np.asarray(label).astype(np.uint8)
    if et_label == 4:
        return label
    out = label.copy()
    out[label == 4] = et_label
    return out


def allowed_labels(et_label: int) -> tuple[int, ...]:
    """Label values a dataset with this enhancing-tumour value may contain."""
    return (0, 1, 2, et_label)


def subject_file_paths(root: str | os.PathLike, layout: str, index: int, grade: str = "HGG") -> Subject:
    """Where subject number ``index`` lives in a tree of the given release layout.

    Used by the phantom writer, so that written trees are named exactly as the real releases.
    """
    root = os.fspath(root)
    if layout == "brats2018":
        sid = f"Brats18_SYN_{index:04d}_1"
        folder = os.path.join(root, grade, sid)
        suffixes, sep, et = _SUFFIXES_CLASSIC, "_", 4
    elif layout == "brats2021":
        sid = f"BraTS2021_{index:05d}"
        folder = os.path.join(root, sid)
        suffixes, sep, et = _SUFFIXES_CLASSIC, "_", 4
    elif layout == "brats2023":
        sid = f"BraTS-GLI-{index:05d}-000"
        folder = os.path.join(root, sid)
        suffixes, sep, et = _SUFFIXES_2023, "-", 3
    else:
        raise CMFLError(None, f"unknown layout {layout!r}; choose one of {', '.join(WRITABLE_LAYOUTS)}")
    path = lambda key: os.path.join(folder, f"{sid}{sep}{suffixes[key]}.nii.gz")
    return Subject(
        subject_id=sid,
        layout=layout,
        images=tuple(path(m) for m in MODALITIES),  # type: ignore[arg-type]
        label=path("seg"),
        et_label=et,
        grade=grade if layout == "brats2018" else None,
    )


def _release_of(subject_id: str) -> str:
    for prefix, release in _RELEASE_PREFIXES:
        if subject_id.startswith(prefix):
            return release
    return "brats-named"


def _grade_of(path: str) -> str | None:
    for part in reversed(os.path.normpath(path).split(os.sep)):
        if part.upper() in ("HGG", "LGG"):
            return part.upper()
    return None


def _parse(filename: str) -> tuple[str, str, str] | None:
    """(subject id, internal modality key, naming family) of a file name, or None."""
    m = _RE_2023.match(filename)
    if m:
        inverse = {v: k for k, v in _SUFFIXES_2023.items()}
        return m["sid"], inverse[m["mod"]], "2023"
    m = _RE_CLASSIC.match(filename)
    if m:
        return m["sid"], m["mod"], "classic"
    return None


def discover(root: str | os.PathLike, require_labels: bool = True) -> list[Subject]:
    """All subjects below ``root`` (a folder tree, or a CSV of the explicit layout), sorted by id.

    Raises:
      CMFLError: missing or empty root, a subject missing a modality (or its label map when
        ``require_labels``), or a malformed CSV.
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise CMFLError(root, "data root does not exist")
    if os.path.isfile(root):
        if root.lower().endswith(".csv"):
            return _read_csv(root, require_labels)
        raise CMFLError(root, "data root must be a folder or a .csv listing subjects")

    groups: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    family: dict[tuple[str, str], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            parsed = _parse(name)
            if parsed is None:
                continue
            sid, key, fam = parsed
            groups[(dirpath, sid)][key] = os.path.join(dirpath, name)
            family[(dirpath, sid)] = fam

    if not groups:
        raise CMFLError(
            root,
            "no subjects found: expected BraTS file names (e.g. Brats18_*_t1.nii.gz, "
            "BraTS2021_*_t1.nii.gz, BraTS-GLI-*-t1n.nii.gz) or a CSV of the explicit layout",
        )

    subjects = []
    for (dirpath, sid), files in sorted(groups.items(), key=lambda kv: kv[0][1]):
        fam = family[(dirpath, sid)]
        suffixes = _SUFFIXES_2023 if fam == "2023" else _SUFFIXES_CLASSIC
        missing = [suffixes[m] for m in MODALITIES if m not in files]
        if missing:
            raise CMFLError(dirpath, f"subject {sid} is missing modality {', '.join(missing)}")
        if require_labels and "seg" not in files:
            raise CMFLError(dirpath, f"subject {sid} has no label map (*{suffixes['seg']}.nii.gz)")
        subjects.append(
            Subject(
                subject_id=sid,
                layout="brats2023" if fam == "2023" else _release_of(sid),
                images=tuple(files[m] for m in MODALITIES),  # type: ignore[arg-type]
                label=files.get("seg"),
                et_label=3 if fam == "2023" else 4,
                grade=_grade_of(dirpath),
            )
        )
    _check_unique_ids(root, subjects)
    return subjects


def _check_unique_ids(root: str, subjects: list[Subject]) -> None:
    seen: dict[str, str] = {}
    for s in subjects:
        if s.subject_id in seen:
            raise CMFLError(root, f"subject id {s.subject_id} appears twice ({seen[s.subject_id]} and {s.folder})")
        seen[s.subject_id] = s.folder


def _read_csv(path: str, require_labels: bool) -> list[Subject]:
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
        et_text = (row.get("et_label") or "4").strip()
        if et_text not in ("3", "4"):
            raise CMFLError(path, f"line {i}: et_label must be 3 or 4, got {et_text!r}")
        subjects.append(
            Subject(
                subject_id=sid,
                layout="csv",
                images=tuple(resolve(row[m]) for m in MODALITIES),  # type: ignore[arg-type]
                label=resolve(label) if label else None,
                et_label=int(et_text),
                grade=(row.get("grade") or "").strip().upper() or None,
            )
        )
    _check_unique_ids(path, subjects)
    return subjects
