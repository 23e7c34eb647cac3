"""The phantom's glioma: its drawn shape and position, and its labels and soft fractions per voxel.

A tumour of random smooth shape is centred in the white matter of a cerebral hemisphere: a necrotic core
(label 1) inside an enhancing rim (label 4), surrounded by oedema (label 2) that spreads along the white
matter and spares the CSF; an LGG-like tumour has a non-enhancing core (all label 1, no label 4). Sizes are
drawn so that the whole tumour has 20-200 cm^3 at the BraTS grid (about 2-15 % of the brain); lengths are in
template mm, so on other grids it keeps the same share of the brain.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from cmfl_jax.synthetic.anatomy import FIT_MAX_SCALE, Grid, Template
from cmfl_jax.synthetic.fields import interp_matrix, rotation, sigmoid, upsample

_REF_SCALE = FIT_MAX_SCALE  # template mm -> mm at the BraTS grid (largest heads), for tumour sizes
_WT_RANGE_CM3 = (24.0, 185.0)  # whole-tumour volume kept within this range (cm^3 at the BraTS grid)


@dataclasses.dataclass(frozen=True, eq=False)
class TumourShape:
    """One subject's tumour, as drawn by :func:`draw_shape`; lengths in template mm.

    The values are kept exactly as drawn (NumPy or Python scalars): converting them would change
    NumPy's type promotion against float32 arrays and so the phantom's bits.

    Attributes:
      centre: (3,) template world position of the tumour centre.
      core_metric: (3, 3) float32 matrix, determinant 1, that turns an offset from the centre into the
        core's anisotropic radius ``|core_metric @ d|`` (an elongated, flattened blob).
      whole_metric: the same for the whole tumour (oedema included).
      r_core: mean radius of the tumour core (enhancing rim and necrosis, or the LGG-like core).
      r_whole: mean radius of the whole tumour.
      rim: thickness of the enhancing rim around the necrotic core (HGG only).
      shell: least oedema around the core.
      enhancing: True for HGG (necrosis inside an enhancing rim), False for the LGG-like core.
      push: template mm^3 of anatomy the tumour's mass effect displaces outward.
    """

    centre: np.ndarray
    core_metric: np.ndarray
    whole_metric: np.ndarray
    r_core: float
    r_whole: float
    rim: float
    shell: float
    enhancing: bool
    push: float


class TumourFields(NamedTuple):
    """The tumour at the brain voxels near it (``sel``: indices into the N brain voxels of :class:`Tissues`)."""

    sel: np.ndarray
    whole: np.ndarray  # soft whole-tumour fraction
    core: np.ndarray  # soft tumour-core fraction
    necrosis: np.ndarray  # soft necrosis fraction (0 for LGG-like)
    texture: np.ndarray  # smooth noise in [-2, 2]
    fluid: np.ndarray  # the oedema's fluid share: mostly fluid near the core, more tissue further out
    label: np.ndarray  # uint8 labels in {0, 1, 2, 4}


def _random_spd(rng: np.random.Generator, spread: float) -> np.ndarray:
    """A random rotation and axis stretch with determinant 1 (elongated, flattened blobs)."""
    stretch = np.exp(rng.normal(0.0, spread, 3))
    stretch /= np.prod(stretch) ** (1 / 3)
    rot = rotation(rng.uniform(-180, 180, 3))
    return (rot @ np.diag(1 / stretch) @ rot.T).astype(np.float32)


def _pick_centre(rng, tmpl: Template, r_core: float, to_voxel, n: np.ndarray, r_vox: float) -> np.ndarray:
    """A deep white-matter point whose tumour core stays inside the brain and the tumour inside the grid."""
    vox = to_voxel(tmpl.centres)
    in_grid = np.all((vox >= min(r_vox, n.min() / 4)) & (vox <= n - 1 - min(r_vox, n.min() / 4)), axis=1)
    for need in (r_core + 6.0, r_core, 0.0):
        ok = np.nonzero(in_grid & (tmpl.centre_depth >= need))[0]
        if ok.size:
            return tmpl.centres[rng.choice(ok)] + rng.uniform(-1.0, 1.0, 3)
    return tmpl.centres[rng.integers(len(tmpl.centres))]


def draw_shape(rng: np.random.Generator, tmpl: Template, grid: Grid, hgg: bool) -> TumourShape:
    """Size, position, shape and mass effect of one tumour (template mm; 0.95 template mm ~ 1 mm at BraTS)."""
    v_wt = np.exp(rng.uniform(np.log(50.0), np.log(170.0))) * 1000.0 / _REF_SCALE**3  # template mm^3
    r_wt = (3 * v_wt / (4 * np.pi)) ** (1 / 3)
    r_core = r_wt * (rng.uniform(0.62, 0.82) if hgg else rng.uniform(0.55, 0.78))
    rim = rng.uniform(2.2, 5.0) / _REF_SCALE
    shell = rng.uniform(1.5, 4.0) / _REF_SCALE  # least oedema around the core
    n = np.asarray(grid.shape, np.float64)
    r_vox = r_wt * float(np.max(grid.scale) / grid.spacing.min())
    centre = _pick_centre(rng, tmpl, r_core, grid.to_voxel, n, r_vox)
    core_metric = _random_spd(rng, 0.18)
    whole_metric = _random_spd(rng, 0.25)
    push = (rng.uniform(0.35, 0.8) if hgg else rng.uniform(0.15, 0.4)) * r_core**3
    return TumourShape(centre=centre, core_metric=core_metric, whole_metric=whole_metric, r_core=r_core,
                       r_whole=r_wt, rim=rim, shell=shell, enhancing=hgg, push=push)


def fields(
    rng: np.random.Generator, tumour: TumourShape, grid: Grid, idx: np.ndarray, wm: np.ndarray, csf: np.ndarray
) -> TumourFields:
    """Soft tumour fractions and labels at the brain voxels near the tumour.

    ``idx`` (3, N) are the output voxel indices of the brain, ``wm`` and ``csf`` (N,) their tissue
    fractions. Distances are in template mm, so the tumour keeps its size relative to the brain on any
    grid. The whole tumour's volume is brought into the plausible BraTS range by rescaling (at most a
    few rounds; the random shape makes the volume hard to predict exactly).
    """
    centre, metrics = tumour.centre, (tumour.core_metric, tumour.whole_metric)
    r_core, r_wt, hgg = tumour.r_core, tumour.r_whole, tumour.enhancing
    g_mat, g_vec, vox_t = grid.g_mat, grid.g_vec, grid.voxel_mm
    lattice_step = 7.0  # template mm between random nodes of the shape noise
    half = 2.5 * r_wt + 3 * lattice_step
    nodes = int(np.ceil(2 * half / lattice_step)) + 1
    noise = rng.normal(0.0, 1.0, (4, nodes, nodes, nodes)).astype(np.float32)
    fine_n = int(np.ceil(2 * half / 1.5)) + 1  # 1.5 mm lattice, then linear interpolation per voxel
    fine = upsample(noise, [interp_matrix(fine_n, nodes)] * 3)
    wm_bias = np.float32(0.3)
    ratio = 1.0
    width = np.float32(0.45 * vox_t)
    # Farthest extent of each boundary (noise is clipped to +-2), so nothing is cut off by the selection.
    stretch = [1.0 / float(np.linalg.eigvalsh(m).min()) for m in metrics]
    for _ in range(4):
        reach = max(r_core * 1.4 * stretch[0], r_wt * 1.62 * stretch[1]) * ratio + 2 * vox_t
        reach_vox = reach * float(np.max(grid.scale)) / grid.spacing + 1
        c_vox = np.linalg.solve(g_mat, centre - g_vec)
        near = np.all(np.abs(idx - c_vox[:, None]) <= reach_vox[:, None], axis=0)
        sel = np.nonzero(near)[0]
        d = (g_mat.astype(np.float32) @ idx[:, sel].astype(np.float32)) + (g_vec - centre).astype(np.float32)[:, None]
        q = np.clip((d + half) / (2 * half) * (fine_n - 1), 0, fine_n - 1)
        n_core, n_rim, n_wt, tex = (
            np.clip(ndimage.map_coordinates(f, q, order=1, prefilter=False), -2, 2) for f in fine
        )
        r1 = np.sqrt(np.sum((tumour.core_metric @ d) ** 2, axis=0))
        r2 = np.sqrt(np.sum((tumour.whole_metric @ d) ** 2, axis=0))
        f_core = r1 - r_core * ratio * (1 + 0.2 * n_core)
        f_nec = f_core + np.maximum(tumour.rim * (1 + 0.35 * n_rim), 1.3 * vox_t)  # >= 1 voxel of rim on coarse grids
        f_wt = r2 - r_wt * ratio * (1 + 0.25 * n_wt + wm_bias * (wm[sel] - 0.6))
        s_core = sigmoid(-f_core / width)
        s_nec = sigmoid(-f_nec / width) if hgg else np.zeros_like(s_core)
        f_wt = np.minimum(f_wt, f_core - tumour.shell)  # oedema surrounds the core
        s_wt = np.maximum(s_core, sigmoid(-f_wt / width) * (1 - csf[sel]) ** 2)
        ref_cm3 = np.count_nonzero(s_wt >= 0.5) * grid.voxel_ref_mm3 / 1000.0
        if _WT_RANGE_CM3[0] <= ref_cm3 <= _WT_RANGE_CM3[1]:
            break
        target = float(np.clip(ref_cm3, *_WT_RANGE_CM3))
        ratio *= (target / max(ref_cm3, 1e-3)) ** (1 / 3) * (1.03 if ref_cm3 < target else 0.97)
    lab = np.where(s_wt >= 0.5, 2, 0).astype(np.uint8)
    lab[s_core >= 0.5] = 4 if hgg else 1
    lab[s_nec >= 0.5] = 1
    # Oedema is infiltrated tissue: mostly fluid near the core, more tissue further out.
    alpha = np.clip(0.45 + 0.4 * np.exp(-np.maximum(f_core, 0) / 10.0) + 0.1 * n_rim, 0.3, 0.95).astype(np.float32)
    return TumourFields(sel=sel, whole=s_wt, core=s_core, necrosis=s_nec, texture=tex.astype(np.float32), fluid=alpha,
                        label=lab)
