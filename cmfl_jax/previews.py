"""PNG previews where a picture says more than numbers: CMFT translations, segmentation overlays."""

from __future__ import annotations

import os

import numpy as np

from cmfl_jax.data.io import atomic_path

# Colours of the internal labels in overlays: NCR/NET red, oedema green, enhancing yellow; cystic component
# (PED 2024) blue, resection cavity (GLI 2024 post-treatment) magenta.
LABEL_COLOURS = {1: (1.0, 0.1, 0.1), 2: (0.1, 0.9, 0.1), 3: (0.2, 0.5, 1.0), 4: (1.0, 0.9, 0.0),
                 5: (0.9, 0.2, 0.9)}


def new_figure(nrows: int, ncols: int, size: float = 2.2):
    """A matplotlib figure (Agg backend) with a grid of axes, axes hidden until used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return plt, fig, axes


def save_figure(plt, fig, path: str) -> None:
    """Write the figure as PNG atomically and free it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def middle_slice(volume: np.ndarray) -> np.ndarray:
    """The axial (last spatial axis) middle slice of a ``(D, H, W[, C])`` volume."""
    return volume[:, :, volume.shape[2] // 2]


def overlay(gray: np.ndarray, label: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
    """RGB image of a grey slice with coloured labels on top."""
    lo, hi = np.percentile(gray, [1, 99]) if gray.any() else (0.0, 1.0)
    g = np.clip((gray - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.stack([g, g, g], -1)
    if label is not None:
        for value, colour in LABEL_COLOURS.items():
            m = label == value
            rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(colour)
    return np.rot90(rgb)


def save_translation_png(path: str, a: np.ndarray, b: np.ndarray, outputs: dict, title: str = "") -> None:
    """Middle slices of real A, fake B, reconstructed A / real B, fake A, reconstructed B (channel 0 and 1 rows).

    ``a``, ``b`` are ``(D, H, W, 2)``; ``outputs`` holds ``fake_b, rec_a, fake_a, rec_b`` (cycle) or
    ``out_a, out_b`` (self-reconstruction).
    """
    if "fake_b" in outputs:
        columns = [("real A", a), ("fake B", outputs["fake_b"]), ("rec A", outputs["rec_a"]),
                   ("real B", b), ("fake A", outputs["fake_a"]), ("rec B", outputs["rec_b"])]
    else:
        columns = [("real A", a), ("out A", outputs["out_a"]), ("real B", b), ("out B", outputs["out_b"])]
    plt, fig, axes = new_figure(2, len(columns))
    for col, (name, volume) in enumerate(columns):
        for ch in range(2):
            axes[ch, col].imshow(overlay(middle_slice(np.asarray(volume))[..., ch], None))
            axes[ch, col].set_title(f"{name} ch{ch}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_figure(plt, fig, path)


def tumour_slice(label: np.ndarray | None, depth: int) -> int:
    """Index of the axial slice (last spatial axis) with the most tumour voxels; the middle one if none."""
    if label is None or not np.any(label):
        return depth // 2
    return int(np.argmax(np.count_nonzero(label, axis=(0, 1))))


def save_segmentation_png(path: str, image: np.ndarray, label: np.ndarray | None, pred: np.ndarray,
                          title: str = "") -> None:
    """Axial slice through the tumour: FLAIR and T1c, then the label and the prediction over FLAIR.

    ``image`` is ``(D, H, W, 4)`` in the order t1, t1ce, t2, flair; ``label``/``pred`` are 0/1/2/4 maps.
    """
    z = tumour_slice(label if label is not None else pred, image.shape[2])
    flair, t1ce = image[:, :, z, 3], image[:, :, z, 1]
    panels = [("FLAIR", overlay(flair, None)), ("T1c", overlay(t1ce, None))]
    if label is not None:
        panels.append(("label", overlay(flair, label[:, :, z])))
    panels.append(("prediction", overlay(flair, pred[:, :, z])))
    save_panels(path, panels, title)


def save_panels(path: str, panels: list[tuple[str, np.ndarray]], title: str = "") -> None:
    """One row of titled RGB panels (:func:`overlay`'s), written to ``path``."""
    plt, fig, axes = new_figure(1, len(panels), size=2.6)
    for ax, (name, rgb) in zip(axes[0], panels, strict=True):
        ax.imshow(rgb)
        ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_figure(plt, fig, path)


def tumour_centre(mask: np.ndarray | None, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Voxel at the tumour's centre of mass (rounded), or the volume's centre when there is no tumour."""
    if mask is None or not np.any(mask):
        return tuple(s // 2 for s in shape[:3])  # type: ignore[return-value]
    return tuple(int(np.rint(c)) for c in np.argwhere(mask).mean(axis=0))  # type: ignore[return-value]


def save_orthogonal_png(path: str, image: np.ndarray, pred: np.ndarray, label: np.ndarray | None = None,
                        title: str = "") -> None:
    """Sagittal, coronal and axial FLAIR slices through the tumour centre, prediction (and label) overlaid.

    ``image`` is ``(D, H, W, 4)`` (t1, t1ce, t2, flair); ``pred``/``label`` are 0/1/2/4 maps. Rows are the
    three planes; columns FLAIR, prediction, and label when given.
    """
    centre = tumour_centre(label if label is not None else pred > 0, image.shape)
    flair = image[..., 3]
    columns = [("FLAIR", None), ("prediction", pred)] + ([("label", label)] if label is not None else [])
    plt, fig, axes = new_figure(3, len(columns), size=2.4)
    for row, axis in enumerate(("sagittal", "coronal", "axial")):
        index = [slice(None)] * 3
        index[row] = centre[row]
        for col, (name, volume) in enumerate(columns):
            axes[row, col].imshow(overlay(flair[tuple(index)], None if volume is None else volume[tuple(index)]))
            axes[row, col].set_title(f"{name}, {axis} {centre[row]}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_figure(plt, fig, path)
