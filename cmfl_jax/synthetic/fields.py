"""Smooth random fields from coarse lattices, by separable interpolation (matrix products per axis).

The deformation, the mass effect and the tumour's shape noise are smooth, so they are drawn or computed on
a coarse lattice and interpolated: three small matrix products instead of a 3-D spline per voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
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


def upsample(coarse: np.ndarray, mats: Sequence[np.ndarray]) -> np.ndarray:
    """Apply one interpolation matrix per spatial axis to ``coarse`` (..., m0, m1, m2) -> (..., n0, n1, n2)."""
    out = coarse
    lead = coarse.ndim - 3
    for ax, w in enumerate(mats):
        out = np.moveaxis(np.tensordot(w, out, axes=(1, lead + ax)), 0, lead + ax)
    return np.ascontiguousarray(out)


def rotation(angles_deg: np.ndarray) -> np.ndarray:
    """3x3 rotation by angles (degrees) about x, then y, then z."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function in float32: soft boundaries, so partial-volume voxels mix two tissues."""
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)
