"""One synthetic subject from its seed: anatomy, then tumour, then contrasts, all from one random stream.

The order of the random draws is part of the data set's identity: the same seed gives the same bits in every
release, so cached data sets, demo results and published pictures stay valid. Each step below draws from the
one generator in a fixed order; do not reorder them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cmfl_jax.errors import CMFLError
from cmfl_jax.synthetic.anatomy import BRATS_SHAPE, place, template, tissues
from cmfl_jax.synthetic.contrast import render
from cmfl_jax.synthetic.tumour import draw_shape, fields

LGG_FRACTION = 0.25  # share of LGG-like subjects when the seed decides
MIN_SIZE = 16  # voxels per axis; smaller grids cannot hold a brain with a tumour


@dataclasses.dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic subject.

    Attributes:
      images: (4, *shape) float32, channels T1, T1c, T2, FLAIR; exactly 0 outside the brain.
      label: shape uint8 in {0, 1, 2, 4} (background, NCR/NET, oedema, enhancing tumour).
      affine: 4x4 float64 voxel-to-world matrix, BraTS-like (``diag(-sx, -sy, sz)``, LPS voxel order).
      grade: "HGG" (enhancing) or "LGG" (LGG-like: no enhancing tumour).
      spacing: voxel size in mm.
      centre: voxel index of the tumour centre (for slicing pictures through the tumour).
    """

    images: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    grade: str
    spacing: tuple[float, float, float]
    centre: tuple[int, int, int]


def brats_affine(shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """The voxel-to-world matrix of the BraTS 2018 files, ``diag(-sx, -sy, sz)`` with origin (0, (ny-1)*sy, 0)."""
    sx, sy, sz = (float(s) for s in spacing)
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[1, 3] = (shape[1] - 1) * sy
    return affine


def subject_seed(seed: int, index: int) -> int:
    """Seed of subject ``index`` of a data set written with ``seed`` (so subjects never share streams)."""
    return seed * 100003 + index


def grade_of_seed(seed: int, lgg_fraction: float = LGG_FRACTION) -> str:
    """The grade the seed gives (cheap: lets ``write_dataset`` find existing files without making them).

    ``lgg_fraction`` is the share of LGG-like subjects (no enhancing tumour) over seeds; raising it makes a data set
    where more subjects have no ET, the case the BraTS scoring punishes hardest."""
    return "LGG" if np.random.default_rng([seed, 1]).random() < lgg_fraction else "HGG"


def check_args(seed: int, shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, ...], np.ndarray]:
    """The shape as ints and the spacing as a float64 array; a :class:`CMFLError` naming a bad argument."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise CMFLError("seed", f"must be a non-negative integer, got {seed!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < MIN_SIZE:
        raise CMFLError("shape", f"must be 3 sizes of at least {MIN_SIZE} voxels, got {shape}")
    spacing_arr = np.asarray(spacing, np.float64)
    if spacing_arr.shape != (3,) or not np.all(np.isfinite(spacing_arr)) or np.any(spacing_arr <= 0):
        raise CMFLError("spacing", f"must be 3 positive voxel sizes in mm, got {tuple(spacing)}")
    return shape, spacing_arr


def make_subject(
    seed: int,
    shape: Sequence[int] = BRATS_SHAPE,
    *,
    lgg: bool | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    lgg_fraction: float = LGG_FRACTION,
) -> Phantom:
    """One synthetic BraTS subject, a deterministic function of its arguments.

    Args:
      seed: non-negative integer; equal seeds give bit-equal subjects.
      shape: voxels per axis (BraTS: 240, 240, 155); the brain is scaled to fit smaller grids.
      lgg: True for an LGG-like subject (no enhancing tumour), False for HGG, None to let the seed
        decide (``lgg_fraction`` of the seeds are LGG, 25 % by default).
      spacing: voxel size in mm, written into the affine.
    """
    shape, spacing_arr = check_args(seed, shape, spacing)
    grade = grade_of_seed(int(seed), lgg_fraction) if lgg is None else ("LGG" if lgg else "HGG")
    hgg = grade == "HGG"
    rng = np.random.default_rng([int(seed), 2])
    tmpl = template()
    grid = place(rng, tmpl, shape, spacing_arr)  # head size, rotation, shift
    tumour = draw_shape(rng, tmpl, grid, hgg)  # tumour size, position, shape, mass effect
    brain = tissues(rng, tmpl, grid, tumour.centre, tumour.push, 2.0 * tumour.r_whole)  # deformed anatomy
    lesion = fields(rng, tumour, grid, brain.idx, brain.wm, brain.csf)  # labels and soft fractions
    images = render(rng, shape, brain, lesion, hgg)  # contrasts, bias, noise

    label = np.zeros(shape, np.uint8)
    label[tuple(brain.idx[:, lesion.sel])] = lesion.label
    n = np.asarray(shape, np.float64)
    centre_vox = tuple(int(c) for c in np.clip(np.round(grid.to_voxel(tumour.centre[None])[0]), 0, n - 1))
    return Phantom(
        images=images,
        label=label,
        affine=brats_affine(shape, spacing_arr),
        grade=grade,
        spacing=tuple(float(s) for s in spacing_arr),  # type: ignore[arg-type]
        centre=centre_vox,  # type: ignore[arg-type]
    )
