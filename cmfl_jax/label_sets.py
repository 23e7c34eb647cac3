"""The BraTS label sets: one table entry per release convention, and the conversions to and from it.

A release writes its tissues with its own values (ET is 4 in 2017-2021, 3 in 2023, 1 in the 2024 paediatric
release). Inside the package every label map uses one tissue vocabulary, :data:`TISSUES` (0 background, 1
non-enhancing core, 2 oedema, 3 cystic component, 4 enhancing tumour, 5 resection cavity), so that the cache,
the post-processing and the previews need no release-specific code. A :class:`LabelSet` says, for one release:
its label values and their names, which tissue each value is, the regions the challenge scores (in the
release's values), and hence the network's classes (background plus the set's tissues, in tissue order) and
what :func:`to_dataset` writes for each predicted class. Supporting a new release is one entry in
:data:`LABEL_SETS`.

``config.data.label_set`` chooses: ``auto`` (each subject its naming's default set, see
:mod:`cmfl_jax.data.layouts`; the names of GLI 2023 and GLI 2024 post-treatment are the same, so ``auto`` never
picks ``brats2024_gli``), or a name of :data:`LABEL_SETS`, which then applies to every subject.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np

from cmfl_jax.errors import CMFLError

# The internal tissue vocabulary; 0/1/2/4 are the BraTS 2017-2021 values, so a legacy label map is unchanged.
TISSUES = {0: "background", 1: "NCR/NET", 2: "ED", 3: "CC", 4: "ET", 5: "RC"}
AUTO = "auto"
KEY = "config.data.label_set"


@dataclasses.dataclass(frozen=True, eq=False)  # the table's entries are the only instances: compared as objects
class LabelSet:
    """One release's label convention.

    Attributes:
      name: the value of ``config.data.label_set``.
      title: the releases and tasks it covers (for messages and docs).
      labels: release value -> (name, internal tissue of :data:`TISSUES`); background 0 is implied.
      regions: scored region -> the release values it unites, in the order tables show them.
    """

    name: str
    title: str
    labels: Mapping[int, tuple[str, int]]
    regions: Mapping[str, tuple[int, ...]]

    @property
    def values(self) -> tuple[int, ...]:
        """Every value a label map of this set may hold, background included."""
        return (0, *sorted(self.labels))

    @functools.cached_property
    def classes(self) -> tuple[int, ...]:
        """The network's classes as internal tissues: class ``i`` is tissue ``classes[i]`` (0 = background)."""
        return (0, *sorted(tissue for _, tissue in self.labels.values()))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @functools.cached_property
    def internal_regions(self) -> dict[str, tuple[int, ...]]:
        """The scored regions in internal tissues (what the metrics of an internal label map use)."""
        return {r: tuple(sorted(self.labels[v][1] for v in vs)) for r, vs in self.regions.items()}

    def value_of(self, tissue: int) -> int:
        """The release value of an internal tissue (0 for background)."""
        return next((v for v, (_, t) in self.labels.items() if t == tissue), 0) if tissue else 0

    @property
    def et_label(self) -> int:
        """The release value of enhancing tumour."""
        return self.value_of(4)


_ET_WT_TC_2023 = {"ET": (3,), "WT": (1, 2, 3), "TC": (1, 3)}
LABEL_SETS: dict[str, LabelSet] = {s.name: s for s in (
    LabelSet("brats2021", "BraTS 2017-2021 gliomas", {1: ("NCR/NET", 1), 2: ("ED", 2), 4: ("ET", 4)},
         {"ET": (4,), "WT": (1, 2, 4), "TC": (1, 4)}),
    LabelSet("brats2023", "BraTS 2023+ GLI (pre-treatment), MEN, MET, SSA; PED 2023",
         {1: ("NCR/NETC", 1), 2: ("ED/SNFH", 2), 3: ("ET", 4)}, _ET_WT_TC_2023),
    LabelSet("brats2024_gli", "BraTS 2024 GLI post-treatment (4 = resection cavity)",
         {1: ("NETC", 1), 2: ("SNFH", 2), 3: ("ET", 4), 4: ("RC", 5)}, {**_ET_WT_TC_2023, "RC": (4,)}),
    LabelSet("brats2024_ped", "BraTS 2024 PED (paediatric tumours)",
         {1: ("ET", 4), 2: ("NET", 1), 3: ("CC", 3), 4: ("ED", 2)},
         {"ET": (1,), "WT": (1, 2, 3, 4), "TC": (1, 2, 3), "NETC": (2,), "CC": (3,), "ED": (4,)}),
)}
CHOICES = (AUTO, *LABEL_SETS)
LEGACY = "brats2021"  # the classes of a run from before label sets: 0/1/2/4


def label_set(name: str | LabelSet, key: str = KEY) -> LabelSet:
    """The :class:`LabelSet` called ``name``; a one-line ``key`` error for an unknown name."""
    if isinstance(name, LabelSet):
        return name
    if name not in LABEL_SETS:
        raise CMFLError(key, f"unknown label set {name!r}; choose one of {', '.join(CHOICES)}")
    return LABEL_SETS[name]


def check_choice(value: str, key: str = KEY) -> str:
    """``value`` if it is ``auto`` or a label set's name, else a one-line ``key`` error."""
    return value if value == AUTO else label_set(value, key).name


def of_et_label(et_label: int) -> LabelSet:
    """The set that an enhancing-tumour value names (4: BraTS 2017-2021, 3: 2023+): the CSV column, config.case."""
    return LABEL_SETS["brats2023" if int(et_label) == 3 else LEGACY]


def as_label_set(convention: int | str | LabelSet) -> LabelSet:
    """A label set from a set, its name, or (the older API) the enhancing-tumour value."""
    if isinstance(convention, (int, np.integer)):
        return of_et_label(int(convention))
    return label_set(convention)


def extends(name: str, base: str) -> bool:
    """Whether set ``name`` has every value of ``base`` with the same tissue (brats2024_gli extends brats2023): a
    model of ``name`` then predicts ``base``'s data in ``name``'s values."""
    wide, narrow = label_set(name), label_set(base)
    return all(wide.labels.get(v, (None, None))[1] == t for v, (_, t) in narrow.labels.items())


def _lookup(pairs: dict[int, int]) -> np.ndarray:
    table = np.zeros(256, np.uint8)
    for old, new in pairs.items():
        table[old] = new
    return table


def to_internal(label: np.ndarray, convention: int | str | LabelSet) -> np.ndarray:
    """A release's label map in internal tissues (uint8, a copy); values outside the set become 0 (check first
    with :func:`check_values`)."""
    ls = as_label_set(convention)
    return _lookup({v: t for v, (_, t) in ls.labels.items()})[np.asarray(label).astype(np.uint8)]


def to_dataset(label: np.ndarray, convention: int | str | LabelSet) -> np.ndarray:
    """An internal label map in the release's values (uint8, a copy): what the challenge's scorer reads."""
    ls = as_label_set(convention)
    return _lookup({t: v for v, (_, t) in ls.labels.items()})[np.asarray(label).astype(np.uint8)]


def check_values(path: str, values, convention: int | str | LabelSet) -> None:
    """A one-line error naming ``path`` and the values of ``values`` that the set does not have (and the sets
    they would fit, so that the message says which ``config.data.label_set`` to choose)."""
    ls = as_label_set(convention)
    present = sorted({int(v) for v in np.asarray(values).ravel().tolist()})
    extra = [v for v in present if v not in ls.values]
    if not extra:
        return
    fits = [s.name for s in LABEL_SETS.values() if set(present) <= set(s.values)]
    hint = f"; they fit {', '.join(fits)}: set {KEY}" if fits else ""
    raise CMFLError(path, f"label values {extra} outside {ls.name} ({'/'.join(map(str, ls.values))}){hint}")


def label_set_of_subjects(names, recorded: str = "") -> LabelSet:
    """The one set whose classes a model of subjects of these label sets predicts (sets of equal classes mix:
    brats2021 and brats2023); ``recorded``, a run's ``config.model.label_set``, must have those classes."""
    sets = sorted(set(names))
    if len({LABEL_SETS[n].classes for n in sets}) > 1:
        raise CMFLError(KEY, f"the subjects mix label sets of different classes ({', '.join(sets)}); choose one")
    if not sets:
        return label_set(recorded or LEGACY, "config.model.label_set")
    if recorded and label_set(recorded, "config.model.label_set").classes != LABEL_SETS[sets[0]].classes:
        raise CMFLError("config.model.label_set", f"{recorded} does not have the classes of the data's "
                                                  f"{sets[0]}; leave it empty (the data decides)")
    return label_set(recorded) if recorded else LABEL_SETS[sets[0]]


def run_label_set(config) -> LabelSet:
    """The set whose classes a CMFF run's head predicts: ``config.model.label_set``, which the cmff job resolves
    from the data and records in ``config.json``; a run from before label sets has the classes 0/1/2/4."""
    return label_set(config["model"].get("label_set", "") or LEGACY, "config.model.label_set")
