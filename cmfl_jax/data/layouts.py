"""Discover BraTS subjects on disk from file names, and map label conventions.

Supported layouts (one folder per subject, found anywhere below the root; symbolic links are followed):

* 2017/2018: ``Brats18_<id>_{t1,t1ce,t2,flair,seg}.nii.gz``, often under ``HGG/`` and ``LGG/``;
* 2019-2021: ``BraTS20_Training_001_{...}.nii.gz``, ``BraTS2021_00000_{...}.nii.gz``;
* 2023+: ``BraTS-{GLI,MEN,MET,PED,SSA}-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (enhancing tumour is label 3,
  or 1 for the 2024 paediatric release);
* explicit: a CSV file with columns ``subject_id,t1,t1ce,t2,flair[,seg][,et_label][,label_set]``.

Each BraTS naming family is one :class:`NamingFamily` entry of :data:`NAMING_FAMILIES`; a new release's naming
is supported by adding an entry there and nowhere else.

Each subject gets a label set (:mod:`cmfl_jax.label_sets`): ``config.data.label_set``, or with ``auto`` its
family's default for its id (classic names: brats2021; ``BraTS-PED-``: brats2024_ped; other 2023+ names:
brats2023). Names never tell GLI 2023 from GLI 2024 post-treatment, so ``auto`` never guesses the resection
cavity: a label 4 under brats2023 is an error that names brats2024_gli. ``prefer`` (the set a trained model
predicts) replaces the default when it extends it (brats2024_gli extends brats2023 by RC). Inside the package
labels are internal tissues (0/1/2/4 as in BraTS 2017/2018, plus 3 cystic component, 5 resection cavity);
:func:`to_internal` and :func:`to_dataset` convert.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping

from cmfl_jax.data.csv_layout import read_subject_csv
from cmfl_jax.data.subject import (  # re-exported: the names every layout shares
    INTERNAL_LABELS,
    MODALITIES,
    Subject,
    allowed_labels,
    check_unique_ids,
    to_dataset,
    to_internal,
)
from cmfl_jax.errors import CMFLError
from cmfl_jax.label_sets import AUTO, check_choice, extends

__all__ = ["INTERNAL_LABELS", "MODALITIES", "NAMING_FAMILIES", "WRITABLE_LAYOUTS", "NamingFamily", "Subject",
           "allowed_labels", "discover", "subject_file_paths", "to_dataset", "to_internal"]

@dataclasses.dataclass(frozen=True)
class NamingFamily:
    """How one family of BraTS releases names its files: reading and writing trees share this one description.

    Attributes:
      name: short name, for messages and tests.
      suffixes: file-name suffix of each key of :data:`MODALITIES` and of ``"seg"`` (the label map).
      sep: what separates subject id and suffix (``_`` in ``Brats18_x_t1``, ``-`` in ``BraTS-GLI-..-t1n``).
      id_pattern: regex of a subject id.
      label_set: the label set ``auto`` gives its subjects.
      task_label_sets: ``(id prefix, label set)`` pairs for tasks with another default (first match wins).
      releases: ``(id prefix, layout name)`` pairs naming the release of a subject id (first match wins),
        else ``default_release``.
      writable: ``(layout name, id format with {index}, has HGG/LGG folders)`` per layout it can write.
    """

    name: str
    suffixes: Mapping[str, str]
    sep: str
    id_pattern: str
    label_set: str
    task_label_sets: tuple[tuple[str, str], ...] = ()
    releases: tuple[tuple[str, str], ...] = ()
    default_release: str = "brats-named"
    writable: tuple[tuple[str, str, bool], ...] = ()

    @functools.cached_property
    def pattern(self) -> re.Pattern[str]:
        mods = "|".join(re.escape(self.suffixes[k]) for k in (*MODALITIES, "seg"))
        return re.compile(rf"^(?P<sid>{self.id_pattern}){re.escape(self.sep)}(?P<mod>{mods})\.nii(?:\.gz)?$")

    def release_of(self, subject_id: str) -> str:
        return next((rel for prefix, rel in self.releases if subject_id.startswith(prefix)), self.default_release)

    def label_set_of(self, subject_id: str) -> str:
        """The label set ``auto`` gives a subject of this id."""
        return next((ls for prefix, ls in self.task_label_sets if subject_id.startswith(prefix)), self.label_set)


# Table order is match order: the classic family accepts any id, so it stays last.
NAMING_FAMILIES: tuple[NamingFamily, ...] = (
    NamingFamily(
        name="2023",
        suffixes={"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"},
        sep="-",
        id_pattern=r"BraTS-[A-Za-z]+-\d+-\d+",  # GLI, MEN, MET, PED, SSA (and any later task)
        label_set="brats2023",
        task_label_sets=(("BraTS-PED-", "brats2024_ped"),),
        default_release="brats2023",
        writable=(("brats2023", "BraTS-GLI-{index:05d}-000", False),),
    ),
    NamingFamily(
        name="classic",
        suffixes={"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
        sep="_",
        id_pattern=r".+?",
        label_set="brats2021",
        releases=(
            ("Brats17_", "brats2017"),
            ("Brats18_", "brats2018"),
            ("BraTS19_", "brats2019"),
            ("BraTS20_", "brats2020"),
            ("BraTS2021_", "brats2021"),
        ),
        writable=(("brats2018", "Brats18_SYN_{index:04d}_1", True), ("brats2021", "BraTS2021_{index:05d}", False)),
    ),
)


def _writable() -> dict[str, tuple[NamingFamily, str, bool]]:
    """Layout name -> (family, id format, has HGG/LGG folders), read from the table at call time."""
    return {name: (fam, fmt, graded) for fam in NAMING_FAMILIES for name, fmt, graded in fam.writable}


# Layouts that :func:`subject_file_paths` can write (the phantom uses them).
WRITABLE_LAYOUTS = tuple(sorted(_writable()))


def subject_file_paths(root: str | os.PathLike, layout: str, index: int, grade: str = "HGG") -> Subject:
    """Where subject number ``index`` lives in a tree of the given release layout.

    Used by the phantom writer, so that written trees are named exactly as the real releases.
    """
    if layout not in _writable():
        raise CMFLError(None, f"unknown layout {layout!r}; choose one of {', '.join(sorted(_writable()))}")
    fam, id_format, graded = _writable()[layout]
    sid = id_format.format(index=index)
    folder = os.path.join(os.fspath(root), *([grade] if graded else []), sid)
    path = lambda key: os.path.join(folder, f"{sid}{fam.sep}{fam.suffixes[key]}.nii.gz")
    return Subject(
        subject_id=sid,
        layout=layout,
        images=tuple(path(m) for m in MODALITIES),  # type: ignore[arg-type]
        label=path("seg"),
        label_set=fam.label_set_of(sid),
        grade=grade if graded else None,
    )


def _grade_of(path: str) -> str | None:
    for part in reversed(os.path.normpath(path).split(os.sep)):
        if part.upper() in ("HGG", "LGG"):
            return part.upper()
    return None


def _parse(filename: str) -> tuple[str, str, NamingFamily] | None:
    """(subject id, internal modality key, naming family) of a file name, or None."""
    for fam in NAMING_FAMILIES:
        m = fam.pattern.match(filename)
        if m:
            key = next(k for k, suffix in fam.suffixes.items() if suffix == m["mod"])
            return m["sid"], key, fam
    return None


def _walk(root: str) -> Iterator[tuple[str, list[str]]]:
    """``os.walk`` that follows symbolic links (split folders made of links) but visits each real folder once."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link cycle, or a second link to a folder already read
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        yield dirpath, filenames


def _choose(default: str, label_set: str, prefer: str) -> str:
    if label_set != AUTO:
        return label_set
    return prefer if prefer and extends(prefer, default) else default


def discover(root: str | os.PathLike, require_labels: bool = True, label_set: str = AUTO,
             prefer: str = "") -> list[Subject]:
    """All subjects below ``root`` (a folder tree, or a CSV of the explicit layout), sorted by id.

    ``label_set``: ``config.data.label_set`` (``auto``: each subject its naming's default, or ``prefer`` where
    that extends it; see the module's docstring).

    Raises:
      CMFLError: missing or empty root, a subject missing a modality (or its label map when
        ``require_labels``), or a malformed CSV.
    """
    root = os.fspath(root)
    check_choice(label_set)
    if not os.path.exists(root):
        raise CMFLError(root, "data root does not exist")
    if os.path.isfile(root):
        if root.lower().endswith(".csv"):
            return [dataclasses.replace(s, label_set=_choose(s.label_set, label_set, prefer))
                    for s in read_subject_csv(root, require_labels)]
        raise CMFLError(root, "data root must be a folder or a .csv listing subjects")

    groups: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    family: dict[tuple[str, str], NamingFamily] = {}
    for dirpath, filenames in _walk(root):
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
            "BraTS2021_*_t1.nii.gz, BraTS-{GLI,MEN,MET,PED,SSA}-*-t1n.nii.gz) or a CSV of the explicit layout",
        )

    subjects = []
    for (dirpath, sid), files in sorted(groups.items(), key=lambda kv: kv[0][1]):
        fam = family[(dirpath, sid)]
        missing = [fam.suffixes[m] for m in MODALITIES if m not in files]
        if missing:
            raise CMFLError(dirpath, f"subject {sid} is missing modality {', '.join(missing)}")
        if require_labels and "seg" not in files:
            raise CMFLError(dirpath, f"subject {sid} has no label map (*{fam.suffixes['seg']}.nii.gz)")
        subjects.append(
            Subject(
                subject_id=sid,
                layout=fam.release_of(sid),
                images=tuple(files[m] for m in MODALITIES),  # type: ignore[arg-type]
                label=files.get("seg"),
                label_set=_choose(fam.label_set_of(sid), label_set, prefer),
                grade=_grade_of(dirpath),
            )
        )
    check_unique_ids(root, subjects)
    return subjects


