"""The built-in synthetic BraTS data set: realistic brains with a glioma, made on the spot.

BraTS cannot be downloaded on the machines this project runs on, so every job (and every test)
can run on phantoms instead. A phantom is built from real anatomy: the MNI152 2009 T1 template and
its grey/white-matter probability maps, which ship inside the nilearn package (no download; CSF is
the brain mask minus GM and WM). Per subject, seeded:

* geometry: the brain is scaled to fit the requested grid (BraTS: 240x240x155 at 1 mm, where it has
  about a real brain's size; small grids such as 64^3 hold the same brain, smaller), with a random
  per-axis scale, a small rotation and shift, and a smooth random deformation;
* a tumour of random smooth shape centred in the white matter of a cerebral hemisphere: necrotic
  core (label 1) inside an enhancing rim (label 4), surrounded by oedema (label 2) that spreads
  along the white matter and spares the CSF; its mass effect pushes the anatomy outward;
  about 25 % of the subjects are LGG-like: a non-enhancing core (all label 1, no label 4);
* contrasts per tissue and modality (T1: WM > GM > CSF; T1c: T1 plus the enhancing rim; T2: CSF
  bright, GM > WM; FLAIR: CSF suppressed, oedema brightest), so that the task needs several
  modalities: enhancement shows on T1c only, oedema on T2/FLAIR only (on T1c it is a faint shadow
  between GM and WM), and necrosis and oedema overlap on T2;
* a multiplicative smooth bias field per modality and Rician noise (magnitude of a complex Gaussian).

The background is exactly 0, as in the skull-stripped BraTS volumes, because the pre-processing
z-scores over non-zero voxels. Tumour sizes are drawn so that the whole tumour has 20-200 cm^3 at
the BraTS grid (about 2-15 % of the brain); on other grids it keeps the same fraction of the brain.

Speed: the deformation and the mass effect are computed on a coarse grid and interpolated (separable
matrix products), and only voxels near the brain are sampled. On two CPU cores one 240x240x155
subject takes about 1.5 s, plus about 2 s once per process to load the templates (cached with
``functools.lru_cache``; about 140 MB); writing its five ``.nii.gz`` files takes about 1.5 s more.

Command line::

    python -m cmfl_jax.data.phantom --out DIR --n N [--layout brats2018] [--shape 240,240,155] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from cmfl_jax.data.layouts import WRITABLE_LAYOUTS, Subject, subject_file_paths, to_dataset
from cmfl_jax.errors import CMFLError

BRATS_SHAPE = (240, 240, 155)
LGG_FRACTION = 0.25  # share of LGG-like subjects when the seed decides
MIN_SIZE = 16  # voxels per axis; smaller grids cannot hold a brain with a tumour

# Mean intensity per tissue class and modality (T1, T1c, T2, FLAIR), relative to white matter.
# "oedema" is the fluid part of oedema; oedematous voxels mix it with the tissue they infiltrate.
_CONTRAST = {
    "wm": (1.00, 1.00, 1.00, 1.00),
    "gm": (0.75, 0.77, 1.30, 1.25),
    "csf": (0.30, 0.30, 2.60, 0.33),
    "oedema": (0.72, 0.88, 2.00, 1.95),
    "enhancing": (0.78, 1.85, 1.55, 1.45),
    "necrosis": (0.40, 0.40, 2.00, 1.30),
    "lgg_core": (0.60, 0.62, 2.00, 1.55),
}
# How the T1 template's texture (deep nuclei, cortex detail: T1 minus its tissue model) shows per modality.
_TEXTURE = np.array([1.0, 1.0, -1.2, -0.9], np.float32)
# Scanner gain per modality (raw BraTS intensities are in the hundreds), varied per subject.
_GAIN = np.array([450.0, 600.0, 900.0, 350.0], np.float32)

_FIT_FILL = 0.94  # share of the field of view the brain may span
_FIT_MAX_SCALE = 0.95  # MNI152 is larger than an average brain: never show it larger than this
_FIT_CUT_Z_MM = 8.0  # the lowest brain stem may leave the grid, as in many BraTS volumes
_REF_SCALE = _FIT_MAX_SCALE  # template mm -> mm at the BraTS grid (largest heads), for tumour sizes
_WT_RANGE_CM3 = (24.0, 185.0)  # whole-tumour volume kept within this range (cm^3 at the BraTS grid)


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


@dataclasses.dataclass(frozen=True, eq=False)
class TumourShape:
    """One subject's tumour, as drawn by :func:`make_subject`; lengths in template mm.

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
    """

    centre: np.ndarray
    core_metric: np.ndarray
    whole_metric: np.ndarray
    r_core: float
    r_whole: float
    rim: float
    shell: float
    enhancing: bool


@dataclasses.dataclass(frozen=True, eq=False)
class _Grid:
    """How the output voxel grid maps to template mm: ``y = g_mat @ v + g_vec`` for voxel index ``v``.

    Attributes:
      g_mat, g_vec: the affine map from output voxel index to template world mm.
      spacing: (3,) output voxel size in mm.
      scale: (3,) output mm per template mm, per axis.
      voxel_mm: mean output voxel size in template mm.
      voxel_ref_mm3: one output voxel in mm^3 of the same subject on the BraTS grid.
    """

    g_mat: np.ndarray
    g_vec: np.ndarray
    spacing: np.ndarray
    scale: np.ndarray
    voxel_mm: float
    voxel_ref_mm3: float


# ----------------------------------------------------------------------------------------------
# Template (cached per process)


@dataclasses.dataclass(frozen=True, eq=False)
class _Template:
    maps: np.ndarray  # (4, X, Y, Z) float32: GM, WM, CSF probabilities and T1 (WM = 1), zero outside the brain
    world_to_voxel: np.ndarray  # 4x4
    fit_lo: np.ndarray  # world mm of the brain's bounding box used to fit the grid
    fit_hi: np.ndarray
    centres: np.ndarray  # (K, 3) world mm: deep white matter of the cerebral hemispheres
    centre_depth: np.ndarray  # (K,) mm from each centre to outside the brain


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
    """MNI152 T1, GM, WM and brain mask from nilearn's package data (no download), in one array."""
    from nilearn import datasets  # heavy import: only when phantoms are made

    images = [
        datasets.load_mni152_gm_template(resolution=1),
        datasets.load_mni152_wm_template(resolution=1),
        datasets.load_mni152_template(resolution=1),
        datasets.load_mni152_brain_mask(resolution=1),
    ]
    affine = np.asarray(images[0].affine, np.float64)
    for img in images[1:]:
        if img.shape != images[0].shape or not np.allclose(img.affine, affine):
            raise CMFLError("nilearn MNI152", "templates are not on one grid")
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise CMFLError("nilearn MNI152", "expected a 1 mm RAS template grid")
    gm, wm, t1, mask = (np.asarray(img.dataobj, np.float32) for img in images)
    mask = mask > 0
    gm, wm, t1 = gm * mask, wm * mask, t1 * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0).astype(np.float32)
    t1 = t1 / np.float32(t1[wm > 0.9].mean())

    idx = np.argwhere(mask)
    lo, hi = idx.min(0).astype(np.float64), idx.max(0).astype(np.float64)
    lo[2] += _FIT_CUT_Z_MM
    to_world = lambda v: v + affine[:3, 3]

    # Candidate tumour centres on a 2 mm grid: white matter, away from the midline and the cerebellum.
    step = 2
    depth = ndimage.distance_transform_edt(mask[::step, ::step, ::step], sampling=step)
    wm_smooth = ndimage.uniform_filter(wm[::step, ::step, ::step], 3)
    pos = to_world(np.argwhere(np.ones(depth.shape, bool)).astype(np.float64) * step).reshape(*depth.shape, 3)
    ok = (wm_smooth > 0.55) & (np.abs(pos[..., 0]) > 12) & (pos[..., 2] > -20) & (depth > 12)
    return _Template(
        maps=np.stack([gm, wm, csf, t1]),
        world_to_voxel=np.linalg.inv(affine),
        fit_lo=to_world(lo),
        fit_hi=to_world(hi),
        centres=pos[ok],
        centre_depth=depth[ok],
    )


def _fit_scale(tmpl: _Template, fov: np.ndarray) -> float:
    """Output mm per template mm for the largest heads in a field of view (mm per axis)."""
    return min(_FIT_MAX_SCALE, float(np.min(_FIT_FILL * fov / (tmpl.fit_hi - tmpl.fit_lo))))


@functools.lru_cache(maxsize=2)
def _smoothed_maps(sigma: float) -> np.ndarray:
    """Template maps blurred to the sampling distance of a coarse output grid (anti-aliasing)."""
    maps = _template().maps
    if sigma <= 0:
        return maps
    return np.stack([ndimage.gaussian_filter(m, sigma, truncate=3.0) for m in maps])


# ----------------------------------------------------------------------------------------------
# Smooth fields by separable interpolation of coarse lattices


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) cubic (Keys) interpolation from n_in nodes spanning the same extent as n_out samples."""
    if n_in == 1:
        return np.ones((n_out, 1), np.float32)
    x = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
    base = np.floor(x).astype(np.int64)
    w = np.zeros((n_out, n_in), np.float64)
    for k in range(-1, 3):
        t = np.abs(x - (base + k))
        kern = np.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1, np.where(t < 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0))
        np.add.at(w, (np.arange(n_out), np.clip(base + k, 0, n_in - 1)), kern)
    return w.astype(np.float32)


def _upsample(coarse: np.ndarray, mats: Sequence[np.ndarray]) -> np.ndarray:
    """Apply one interpolation matrix per spatial axis to ``coarse`` (..., m0, m1, m2) -> (..., n0, n1, n2)."""
    out = coarse
    lead = coarse.ndim - 3
    for ax, w in enumerate(mats):
        out = np.moveaxis(np.tensordot(w, out, axes=(1, lead + ax)), 0, lead + ax)
    return np.ascontiguousarray(out)


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Subjects


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
    """The grade the seed gives (cheap: lets :func:`write_dataset` find existing files without making them).

    ``lgg_fraction`` is the share of LGG-like subjects (no enhancing tumour) over seeds; raising it makes a data set
    where more subjects have no ET, the case the BraTS scoring punishes hardest."""
    return "LGG" if np.random.default_rng([seed, 1]).random() < lgg_fraction else "HGG"


def _check_args(seed: int, shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, ...], np.ndarray]:
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
    shape, spacing = _check_args(seed, shape, spacing)
    grade = grade_of_seed(int(seed), lgg_fraction) if lgg is None else ("LGG" if lgg else "HGG")
    hgg = grade == "HGG"
    rng = np.random.default_rng([int(seed), 2])
    tmpl = _template()
    n = np.asarray(shape, np.float64)
    fov = n * spacing
    flip = np.array([-1.0, -1.0, 1.0])  # voxel axes run R->L, A->P, I->S (BraTS, LPS)

    # --- Geometry: template world (mm) y = G @ v + g for output voxel index v.
    s0 = _fit_scale(tmpl, fov)
    size = rng.uniform(0.9, 1.0, 3)  # this subject's head size, relative to the largest
    scale = s0 * size
    rot = _rotation(np.clip(rng.normal(0.0, [2.0, 2.0, 3.0]), -6, 6))
    corners = np.array(np.meshgrid(*zip(tmpl.fit_lo, tmpl.fit_hi, strict=True), indexing="ij")).reshape(3, -1)
    half_span = np.abs((rot * scale) @ (corners - corners.mean(1, keepdims=True))).max(1)
    shrink = min(1.0, float(np.min(0.985 * fov / 2 / half_span)))
    scale, half_span = scale * shrink, half_span * shrink
    forward = rot * scale  # template offsets (mm) -> output physical offsets (mm): diag(scale) then rotation
    margin = np.maximum(fov / 2 - half_span, 0.0)
    shift_out = rng.uniform(-0.6, 0.6, 3) * margin  # output mm
    centre_t = (tmpl.fit_lo + tmpl.fit_hi) / 2 - np.linalg.solve(forward, shift_out)
    g_mat = np.linalg.inv(forward) @ np.diag(flip * spacing)
    g_vec = centre_t - g_mat @ ((n - 1) / 2)
    to_voxel = lambda y: np.linalg.solve(g_mat, (y - g_vec).T).T  # template world -> output voxel index
    vox_t = float(np.mean(spacing / scale))  # output voxel size in template mm
    # One output voxel in mm^3 of the same subject on the BraTS grid: tumour volumes are checked there.
    ref_scale = _fit_scale(tmpl, np.asarray(BRATS_SHAPE, np.float64)) * size * shrink
    voxel_ref_mm3 = float(np.prod(spacing / scale * ref_scale))

    # --- Tumour size and position (template mm; 0.95 template mm ~ 1 mm at the BraTS grid).
    v_wt = np.exp(rng.uniform(np.log(50.0), np.log(170.0))) * 1000.0 / _REF_SCALE**3  # template mm^3
    r_wt = (3 * v_wt / (4 * np.pi)) ** (1 / 3)
    r_core = r_wt * (rng.uniform(0.62, 0.82) if hgg else rng.uniform(0.55, 0.78))
    rim = rng.uniform(2.2, 5.0) / _REF_SCALE
    shell = rng.uniform(1.5, 4.0) / _REF_SCALE  # least oedema around the core
    centre = _pick_centre(rng, tmpl, r_core, to_voxel, n, r_wt * float(np.max(scale) / spacing.min()))
    tumour_shape = TumourShape(
        centre=centre,
        core_metric=_random_spd(rng, 0.18),
        whole_metric=_random_spd(rng, 0.25),
        r_core=r_core,
        r_whole=r_wt,
        rim=rim,
        shell=shell,
        enhancing=hgg,
    )

    # --- Coarse grid: deformation, mass effect, template coordinates.
    step = int(np.clip(np.round(4.0 / vox_t), 1, 4))
    m = np.maximum(np.ceil((n - 1) / step).astype(int) + 1, 2)
    nodes = [np.linspace(0, n[a] - 1, m[a]) for a in range(3)]
    vc = np.stack(np.meshgrid(*nodes, indexing="ij"))  # (3, m0, m1, m2) voxel indices
    y = np.einsum("ab,b...->a...", g_mat, vc) + g_vec[:, None, None, None]
    y = _mass_effect(y, centre, (rng.uniform(0.35, 0.8) if hgg else rng.uniform(0.15, 0.4)) * r_core**3, 2.0 * r_wt)
    lattice = np.maximum(np.round(fov / (scale * 30.0)).astype(int) + 1, 3)
    warp = rng.normal(0.0, 2.5, (3, *lattice)).astype(np.float32)  # template mm
    y = y + _upsample(warp, [_interp_matrix(int(m[a]), int(lattice[a])) for a in range(3)])
    u = np.einsum("ab,b...->a...", tmpl.world_to_voxel[:3, :3], y) + tmpl.world_to_voxel[:3, 3, None, None, None]
    u = u.astype(np.float32)

    # Which voxels can be brain: coarse test, dilated by one node, then the bounding box of those.
    sigma = max(0.0, round(0.45 * (vox_t - 1.0) * 4) / 4)
    maps = _smoothed_maps(sigma)
    brain_c = ndimage.map_coordinates(maps[:3].sum(0), u.reshape(3, -1), order=1, cval=0.0).reshape(u.shape[1:])
    near = ndimage.binary_dilation(brain_c > 0.02, np.ones((3, 3, 3), bool))
    nearest = [np.round(np.arange(shape[a]) * (m[a] - 1) / (shape[a] - 1)).astype(int) for a in range(3)]
    near_full = near[np.ix_(*nearest)]
    box = [np.nonzero(near_full.any(axis=tuple(b for b in range(3) if b != a)))[0] for a in range(3)]
    lo = np.array([b.min() for b in box])
    hi = np.array([b.max() + 1 for b in box])
    mats = [_interp_matrix(shape[a], int(m[a]))[lo[a] : hi[a]] for a in range(3)]
    u_box = _upsample(u, mats)  # (3, box) template voxel coordinates
    cand = near_full[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    pts = u_box[:, cand]
    gm, wm, csf, t1 = (ndimage.map_coordinates(mp, pts, order=1, cval=0.0, prefilter=False) for mp in maps)
    total = gm + wm + csf
    inside = total >= 0.5
    idx = np.stack(np.nonzero(cand))[:, inside] + lo[:, None]  # (3, N) output voxel indices of the brain
    inv_total = 1.0 / total[inside]
    gm, wm, csf, t1 = gm[inside] * inv_total, wm[inside] * inv_total, csf[inside] * inv_total, t1[inside]

    # --- Tumour fields at brain voxels (label and soft fractions for partial volume).
    grid = _Grid(g_mat=g_mat, g_vec=g_vec, spacing=spacing, scale=scale, voxel_mm=vox_t, voxel_ref_mm3=voxel_ref_mm3)
    sel, s_wt, s_core, s_nec, tex, alpha, lab = _tumour(rng, tumour_shape, grid, idx, wm, csf)

    # --- Intensities.
    contrast = {k: np.asarray(v, np.float32) for k, v in _CONTRAST.items()}
    tissue_t1 = gm * contrast["gm"][0] + wm * contrast["wm"][0] + csf * contrast["csf"][0]
    texture = np.clip(t1 - tissue_t1, -0.25, 0.25)
    gain = _GAIN * rng.uniform(0.8, 1.25, 4).astype(np.float32)
    bias_coef = rng.normal(0.0, 0.05, (4, 10)).astype(np.float32)
    bias_coef[:, 0] = 0.0
    basis = _poly_basis(idx, n)
    noise_level = rng.uniform(0.015, 0.04)
    images = np.zeros((4, *shape), np.float32)
    core_key = "necrosis" if hgg else "lgg_core"
    rim_key = "enhancing" if hgg else "lgg_core"
    for ch in range(4):
        normal = gm * contrast["gm"][ch] + wm * contrast["wm"][ch] + csf * contrast["csf"][ch]
        normal = normal + _TEXTURE[ch] * texture
        n_sel = normal[sel]
        oedema = alpha * contrast["oedema"][ch] + (1 - alpha) * n_sel
        value = (
            (1 - s_wt) * n_sel
            + (s_wt - s_core) * oedema * (1 + 0.05 * tex)
            + (s_core - s_nec) * contrast[rim_key][ch] * (1 + 0.1 * tex)
            + s_nec * contrast[core_key][ch] * (1 + 0.16 * tex)
        )
        normal[sel] = value
        bias = np.exp(bias_coef[ch] @ basis)
        clean = normal * bias * gain[ch]
        sd = np.float32(noise_level * gain[ch])
        re = clean + sd * rng.standard_normal(clean.shape, np.float32)
        im = sd * rng.standard_normal(clean.shape, np.float32)
        # Rician magnitude; never exactly 0 inside the brain (0 means background downstream).
        images[ch][tuple(idx)] = np.maximum(np.sqrt(re * re + im * im), np.float32(1e-3))

    label = np.zeros(shape, np.uint8)
    label[tuple(idx[:, sel])] = lab
    centre_vox = tuple(int(c) for c in np.clip(np.round(to_voxel(centre[None])[0]), 0, n - 1))
    return Phantom(
        images=images,
        label=label,
        affine=brats_affine(shape, spacing),
        grade=grade,
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        centre=centre_vox,  # type: ignore[arg-type]
    )


def _random_spd(rng: np.random.Generator, spread: float) -> np.ndarray:
    """A random rotation and axis stretch with determinant 1 (elongated, flattened blobs)."""
    stretch = np.exp(rng.normal(0.0, spread, 3))
    stretch /= np.prod(stretch) ** (1 / 3)
    rot = _rotation(rng.uniform(-180, 180, 3))
    return (rot @ np.diag(1 / stretch) @ rot.T).astype(np.float32)


def _pick_centre(rng, tmpl: _Template, r_core: float, to_voxel, n: np.ndarray, r_vox: float) -> np.ndarray:
    """A deep white-matter point whose tumour core stays inside the brain and the tumour inside the grid."""
    vox = to_voxel(tmpl.centres)
    in_grid = np.all((vox >= min(r_vox, n.min() / 4)) & (vox <= n - 1 - min(r_vox, n.min() / 4)), axis=1)
    for need in (r_core + 6.0, r_core, 0.0):
        ok = np.nonzero(in_grid & (tmpl.centre_depth >= need))[0]
        if ok.size:
            return tmpl.centres[rng.choice(ok)] + rng.uniform(-1.0, 1.0, 3)
    return tmpl.centres[rng.integers(len(tmpl.centres))]


def _mass_effect(y: np.ndarray, centre: np.ndarray, push: float, reach: float) -> np.ndarray:
    """Radial push of the anatomy away from the tumour centre.

    A point at distance r shows the tissue from distance (r^3 - push * exp(-(r/reach)^2))^(1/3): the
    volume ~push is displaced outward, the displacement fading with distance; monotonic in r.
    """
    d = y - centre[:, None, None, None]
    r2 = np.sum(d * d, axis=0)
    r = np.sqrt(r2)
    src3 = np.maximum(r2 * r - push * np.exp(-r2 / reach**2), 0.0)
    factor = np.cbrt(src3) / np.maximum(r, 1e-6)
    return centre[:, None, None, None] + d * factor


def _poly_basis(idx: np.ndarray, n: np.ndarray) -> np.ndarray:
    """(10, N) polynomials of degree <= 2 in the normalised voxel position: a smooth bias field basis."""
    x, y, z = ((idx[a].astype(np.float32) / np.float32(max(n[a] - 1, 1))) * 2 - 1 for a in range(3))
    one = np.ones_like(x)
    return np.stack([one, x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])


def _tumour(
    rng: np.random.Generator, tumour: TumourShape, grid: _Grid, idx: np.ndarray, wm: np.ndarray, csf: np.ndarray
):
    """Soft tumour fractions and labels at the brain voxels near the tumour.

    ``idx`` (3, N) are the output voxel indices of the brain, ``wm`` and ``csf`` (N,) their tissue
    fractions. Distances are in template mm, so the tumour keeps its size relative to the brain on any
    grid. The whole tumour's volume is brought into the plausible BraTS range by rescaling (at most a
    few rounds; the random shape makes the volume hard to predict exactly).

    Returns ``(sel, s_wt, s_core, s_nec, tex, alpha, lab)``: the indices into the N brain voxels near
    the tumour, and at those voxels the soft whole-tumour, core and necrosis fractions, the texture
    noise, the oedema's fluid share, and the labels.
    """
    centre, metrics = tumour.centre, (tumour.core_metric, tumour.whole_metric)
    r_core, r_wt, hgg = tumour.r_core, tumour.r_whole, tumour.enhancing
    g_mat, g_vec, vox_t = grid.g_mat, grid.g_vec, grid.voxel_mm
    lattice_step = 7.0  # template mm between random nodes of the shape noise
    half = 2.5 * r_wt + 3 * lattice_step
    nodes = int(np.ceil(2 * half / lattice_step)) + 1
    noise = rng.normal(0.0, 1.0, (4, nodes, nodes, nodes)).astype(np.float32)
    fine_n = int(np.ceil(2 * half / 1.5)) + 1  # 1.5 mm lattice, then linear interpolation per voxel
    fine = _upsample(noise, [_interp_matrix(fine_n, nodes)] * 3)
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
        s_core = _sigmoid(-f_core / width)
        s_nec = _sigmoid(-f_nec / width) if hgg else np.zeros_like(s_core)
        f_wt = np.minimum(f_wt, f_core - tumour.shell)  # oedema surrounds the core
        s_wt = np.maximum(s_core, _sigmoid(-f_wt / width) * (1 - csf[sel]) ** 2)
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
    return sel, s_wt, s_core, s_nec, tex.astype(np.float32), alpha, lab


# ----------------------------------------------------------------------------------------------
# Writing a data set


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
    shape, spacing_arr = _check_args(0, shape, spacing)
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


# ----------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit status 2 (as the rest of the CLI)
        self.exit(2, f"cmfl_jax.data.phantom: error: {message}\n")


def _triple(kind: type):
    def parse(text: str):
        try:
            values = tuple(kind(t) for t in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers, got {text!r}") from None
        if len(values) != 3:
            raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers, got {text!r}")
        return values

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cmfl_jax.data.phantom --out DIR --n N``: write a synthetic BraTS-layout data set."""
    parser = _Parser(prog="python -m cmfl_jax.data.phantom", description=main.__doc__)
    parser.add_argument("--out", required=True, help="folder to write (created; existing subjects are kept)")
    parser.add_argument("--n", type=int, required=True, help="number of subjects")
    parser.add_argument("--layout", default="brats2018", choices=WRITABLE_LAYOUTS, help="file naming")
    parser.add_argument("--shape", type=_triple(int), default=BRATS_SHAPE, help="voxels, e.g. 240,240,155")
    parser.add_argument("--spacing", type=_triple(float), default=(1.0, 1.0, 1.0), help="mm, e.g. 1,1,1")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (subject i uses seed*100003+i)")
    parser.add_argument("--lgg_fraction", type=float, default=LGG_FRACTION,
                        help="share of LGG-like subjects (no enhancing tumour) over seeds")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)

    from absl import flags, logging

    # Progress lines go to stdout (one per ~10 % when not on a terminal); stderr carries only errors.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])  # absl's defaults; our own options are argparse's
    logging.use_absl_handler()
    logging.get_absl_handler().python_handler.stream = sys.stdout
    logging.set_verbosity(logging.INFO)
    try:
        subjects = write_dataset(
            args.out, args.n, layout=args.layout, shape=args.shape, seed=args.seed,
            progress=not args.quiet, spacing=args.spacing, lgg_fraction=args.lgg_fraction,
        )
    except CMFLError as e:
        print(f"cmfl_jax.data.phantom: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"cmfl_jax.data.phantom: error: {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    if not args.quiet:
        lgg = sum(grade_of_seed(subject_seed(args.seed, i), args.lgg_fraction) == "LGG" for i in range(len(subjects)))
        print(f"{len(subjects)} subjects in {args.out} ({args.layout}; {len(subjects) - lgg} HGG, {lgg} LGG-like)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
