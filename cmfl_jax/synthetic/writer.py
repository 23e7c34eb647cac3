"""Write N phantoms as a BraTS data set on disk, named exactly as a real release, resumable.

The file names and label conventions come from the data layer (:mod:`cmfl_jax.data.layouts`), so a written
tree is read back by the same discovery as real BraTS data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cmfl_jax.data.layouts import WRITABLE_LAYOUTS, Subject, subject_file_paths, to_dataset
from cmfl_jax.errors import CMFLError
from cmfl_jax.synthetic.anatomy import BRATS_SHAPE
from cmfl_jax.synthetic.subject import LGG_FRACTION, check_args, grade_of_seed, make_subject, subject_seed


def _complete(subject: Subject, shape: tuple[int, ...]) -> bool:
    """All five files exist and the label map has the requested shape (header only, no decompression)."""
    import nibabel as nib

    paths = [*subject.images, subject.label]
    if not all(p and os.path.isfile(p) for p in paths):
        return False
    try:
        return tuple(nib.load(subject.label).shape[:3]) == tuple(shape)  # type: ignore[arg-type]
    except Exception:
        return False


def write_dataset(
    out_dir: str | os.PathLike,
    n: int,
    layout: str = "brats2018",
    shape: Sequence[int] = BRATS_SHAPE,
    seed: int = 0,
    progress: bool = True,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    lgg_fraction: float = LGG_FRACTION,
) -> list[Subject]:
    """Write ``n`` phantoms as NIfTI files named exactly as the given BraTS release, and list them.

    Subject ``i`` is ``make_subject(subject_seed(seed, i), shape)``; brats2018 trees put it under
    ``HGG/`` or ``LGG/`` by its grade, brats2023 label maps use 3 for enhancing tumour. Images are
    float32, label maps uint8, with the BraTS-like affine (its zooms are the spacing). Each file is
    written to a temporary name and renamed, so a killed run leaves no half-written file.

    Subjects whose five files already exist with the requested shape are skipped, so re-running is
    cheap and an interrupted run resumes; files are otherwise trusted as they are (a different seed
    is not detected: write a new seed to a new folder).
    """
    from cmfl_jax.data.io import write_nifti

    if layout not in WRITABLE_LAYOUTS:
        raise CMFLError("layout", f"unknown layout {layout!r}; choose one of {', '.join(WRITABLE_LAYOUTS)}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise CMFLError("n", f"must be a positive number of subjects, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise CMFLError("seed", f"must be a non-negative integer, got {seed!r}")
    shape, spacing_arr = check_args(0, shape, spacing)
    if not 0.0 <= lgg_fraction <= 1.0:
        raise CMFLError("lgg_fraction", f"must lie in [0, 1], got {lgg_fraction!r}")
    subjects, todo = [], []
    for i in range(int(n)):
        s = subject_seed(int(seed), i)
        subject = subject_file_paths(out_dir, layout, i, grade_of_seed(s, lgg_fraction))
        subjects.append(subject)
        if not _complete(subject, shape):
            todo.append((s, subject))
    items = todo
    if progress and todo:
        from cmfl_jax.progress import progress as progress_iter

        items = progress_iter(todo, desc=f"phantoms -> {os.fspath(out_dir)}")
    for s, subject in items:
        ph = make_subject(s, shape, spacing=spacing_arr, lgg_fraction=lgg_fraction)
        for path, volume in zip(subject.images, ph.images, strict=True):
            write_nifti(path, volume, ph.affine)
        write_nifti(subject.label, to_dataset(ph.label, subject.et_label), ph.affine)  # type: ignore[arg-type]
    return subjects
