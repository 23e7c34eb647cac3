"""The phantom's anatomy: the MNI152 template placed on the output grid, deformed, and sampled per voxel.

Real anatomy without a download: the MNI152 2009 T1 template and its grey/white-matter probability maps ship
inside the nilearn package (CSF is the brain mask minus GM and WM). Per subject, the brain is scaled to fit the
requested grid (BraTS: 240x240x155 at 1 mm, where it has about a real brain's size; small grids such as 64^3
hold the same brain, smaller) with a random per-axis scale, a small rotation and shift, a smooth random
deformation and the tumour's mass effect. The deformation is computed on a coarse grid and interpolated, and
only voxels near the brain are sampled: that keeps a BraTS-sized subject near 1.5 s on two CPU cores. The
templates are loaded once per process (about 2 s, 140 MB; ``functools.lru_cache``).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage

from cmfl_jax.errors import CMFLError
from cmfl_jax.synthetic.fields import interp_matrix, rotation, upsample

BRATS_SHAPE = (240, 240, 155)
FIT_MAX_SCALE = 0.95  # MNI152 is larger than an average brain: never show it larger than this
_FIT_FILL = 0.94  # share of the field of view the brain may span
_FIT_CUT_Z_MM = 8.0  # the lowest brain stem may leave the grid, as in many BraTS volumes


@dataclasses.dataclass(frozen=True, eq=False)
class Template:
    """The MNI152 maps and where tumours may be centred, in template world mm (1 mm RAS grid)."""

    maps: np.ndarray  # (4, X, Y, Z) float32: GM, WM, CSF probabilities and T1 (WM = 1), zero outside the brain
    world_to_voxel: np.ndarray  # 4x4
    fit_lo: np.ndarray  # world mm of the brain's bounding box used to fit the grid
    fit_hi: np.ndarray
    centres: np.ndarray  # (K, 3) world mm: deep white matter of the cerebral hemispheres
    centre_depth: np.ndarray  # (K,) mm from each centre to outside the brain


@dataclasses.dataclass(frozen=True, eq=False)
class Grid:
    """How the output voxel grid maps to template mm: ``y = g_mat @ v + g_vec`` for voxel index ``v``.

    Attributes:
      g_mat, g_vec: the affine map from output voxel index to template world mm.
      spacing: (3,) output voxel size in mm.
      scale: (3,) output mm per template mm, per axis.
      voxel_mm: mean output voxel size in template mm.
      voxel_ref_mm3: one output voxel in mm^3 of the same subject on the BraTS grid.
      shape: output voxels per axis.
    """

    g_mat: np.ndarray
    g_vec: np.ndarray
    spacing: np.ndarray
    scale: np.ndarray
    voxel_mm: float
    voxel_ref_mm3: float
    shape: tuple[int, ...]

    def to_voxel(self, y: np.ndarray) -> np.ndarray:
        """Template world positions (K, 3) -> output voxel indices (K, 3), fractional."""
        return np.linalg.solve(self.g_mat, (y - self.g_vec).T).T


@dataclasses.dataclass(frozen=True, eq=False)
class Tissues:
    """The brain's voxels: indices ``idx`` (3, N) and per voxel the GM, WM, CSF fractions (sum 1) and the T1."""

    idx: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    t1: np.ndarray


@functools.lru_cache(maxsize=1)
def template() -> Template:
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
    return Template(
        maps=np.stack([gm, wm, csf, t1]),
        world_to_voxel=np.linalg.inv(affine),
        fit_lo=to_world(lo),
        fit_hi=to_world(hi),
        centres=pos[ok],
        centre_depth=depth[ok],
    )


def fit_scale(tmpl: Template, fov: np.ndarray) -> float:
    """Output mm per template mm for the largest heads in a field of view (mm per axis)."""
    return min(FIT_MAX_SCALE, float(np.min(_FIT_FILL * fov / (tmpl.fit_hi - tmpl.fit_lo))))


@functools.lru_cache(maxsize=2)
def _smoothed_maps(sigma: float) -> np.ndarray:
    """Template maps blurred to the sampling distance of a coarse output grid (anti-aliasing)."""
    maps = template().maps
    if sigma <= 0:
        return maps
    return np.stack([ndimage.gaussian_filter(m, sigma, truncate=3.0) for m in maps])


def place(rng: np.random.Generator, tmpl: Template, shape: tuple[int, ...], spacing: np.ndarray) -> Grid:
    """Draw the head's size, rotation and shift, and fit it into the grid (so no brain is cut but the stem)."""
    n = np.asarray(shape, np.float64)
    fov = n * spacing
    flip = np.array([-1.0, -1.0, 1.0])  # voxel axes run R->L, A->P, I->S (BraTS, LPS)
    s0 = fit_scale(tmpl, fov)
    size = rng.uniform(0.9, 1.0, 3)  # this subject's head size, relative to the largest
    scale = s0 * size
    rot = rotation(np.clip(rng.normal(0.0, [2.0, 2.0, 3.0]), -6, 6))
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
    vox_t = float(np.mean(spacing / scale))  # output voxel size in template mm
    # One output voxel in mm^3 of the same subject on the BraTS grid: tumour volumes are checked there.
    ref_scale = fit_scale(tmpl, np.asarray(BRATS_SHAPE, np.float64)) * size * shrink
    voxel_ref_mm3 = float(np.prod(spacing / scale * ref_scale))
    return Grid(g_mat=g_mat, g_vec=g_vec, spacing=spacing, scale=scale, voxel_mm=vox_t, voxel_ref_mm3=voxel_ref_mm3,
                shape=tuple(shape))


def mass_effect(y: np.ndarray, centre: np.ndarray, push: float, reach: float) -> np.ndarray:
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


def tissues(rng: np.random.Generator, tmpl: Template, grid: Grid, centre: np.ndarray, push: float,
            reach: float) -> Tissues:
    """Deform the template (random warp and the tumour's mass effect) and sample it at the brain's voxels."""
    shape, n = grid.shape, np.asarray(grid.shape, np.float64)
    fov, scale, vox_t = n * grid.spacing, grid.scale, grid.voxel_mm
    step = int(np.clip(np.round(4.0 / vox_t), 1, 4))
    m = np.maximum(np.ceil((n - 1) / step).astype(int) + 1, 2)
    nodes = [np.linspace(0, n[a] - 1, m[a]) for a in range(3)]
    vc = np.stack(np.meshgrid(*nodes, indexing="ij"))  # (3, m0, m1, m2) voxel indices
    y = np.einsum("ab,b...->a...", grid.g_mat, vc) + grid.g_vec[:, None, None, None]
    y = mass_effect(y, centre, push, reach)
    lattice = np.maximum(np.round(fov / (scale * 30.0)).astype(int) + 1, 3)
    warp = rng.normal(0.0, 2.5, (3, *lattice)).astype(np.float32)  # template mm
    y = y + upsample(warp, [interp_matrix(int(m[a]), int(lattice[a])) for a in range(3)])
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
    mats = [interp_matrix(shape[a], int(m[a]))[lo[a] : hi[a]] for a in range(3)]
    u_box = upsample(u, mats)  # (3, box) template voxel coordinates
    cand = near_full[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    pts = u_box[:, cand]
    gm, wm, csf, t1 = (ndimage.map_coordinates(mp, pts, order=1, cval=0.0, prefilter=False) for mp in maps)
    total = gm + wm + csf
    inside = total >= 0.5
    idx = np.stack(np.nonzero(cand))[:, inside] + lo[:, None]  # (3, N) output voxel indices of the brain
    inv_total = 1.0 / total[inside]
    return Tissues(idx=idx, gm=gm[inside] * inv_total, wm=wm[inside] * inv_total, csf=csf[inside] * inv_total,
                   t1=t1[inside])
