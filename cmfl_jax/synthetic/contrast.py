"""The phantom's MR contrasts: intensities per tissue and modality, bias field and Rician noise.

Contrasts are set so that the task needs several modalities, as on real scans: T1 (WM > GM > CSF); T1c, T1
plus the enhancing rim; T2 (CSF bright, GM > WM); FLAIR (CSF suppressed, oedema brightest). Enhancement shows
on T1c only, oedema on T2/FLAIR only (on T1c it is a faint shadow between GM and WM), and necrosis and oedema
overlap on T2. Each modality gets a multiplicative smooth bias field and Rician noise (magnitude of a complex
Gaussian). The background stays exactly 0, as in skull-stripped BraTS, because the pre-processing z-scores
over non-zero voxels.
"""

from __future__ import annotations

import numpy as np

from cmfl_jax.synthetic.anatomy import Tissues
from cmfl_jax.synthetic.tumour import TumourFields

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


def _poly_basis(idx: np.ndarray, n: np.ndarray) -> np.ndarray:
    """(10, N) polynomials of degree <= 2 in the normalised voxel position: a smooth bias field basis."""
    x, y, z = ((idx[a].astype(np.float32) / np.float32(max(n[a] - 1, 1))) * 2 - 1 for a in range(3))
    one = np.ones_like(x)
    return np.stack([one, x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])


def render(rng: np.random.Generator, shape: tuple[int, ...], tissues: Tissues, tumour: TumourFields,
           hgg: bool) -> np.ndarray:
    """(4, *shape) float32 images T1, T1c, T2, FLAIR: tissue and tumour mixtures, bias, noise; 0 outside the brain."""
    gm, wm, csf, t1, idx = tissues.gm, tissues.wm, tissues.csf, tissues.t1, tissues.idx
    sel, s_wt, s_core, s_nec, tex, alpha, _ = tumour
    contrast = {k: np.asarray(v, np.float32) for k, v in _CONTRAST.items()}
    tissue_t1 = gm * contrast["gm"][0] + wm * contrast["wm"][0] + csf * contrast["csf"][0]
    texture = np.clip(t1 - tissue_t1, -0.25, 0.25)
    gain = _GAIN * rng.uniform(0.8, 1.25, 4).astype(np.float32)
    bias_coef = rng.normal(0.0, 0.05, (4, 10)).astype(np.float32)
    bias_coef[:, 0] = 0.0
    basis = _poly_basis(idx, np.asarray(shape, np.float64))
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
    return images
