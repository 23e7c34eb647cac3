"""Look at the built-in phantoms: three orthogonal slices through the tumour, four modalities and the labels.

Writes ``docs/phantom_montage.png`` (by default two HGG subjects and one LGG-like subject at the
BraTS grid) and prints each subject's whole-tumour volume and whether it has enhancing tumour, so
that a reader can judge at a glance whether the synthetic data look like skull-stripped BraTS.

    .venv/bin/python -m cmfl_jax.synthetic.montage [--seeds 0,1,2] [--lgg 2] [--out docs/phantom_montage.png]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import numpy as np

from cmfl_jax.data.io import atomic_path
from cmfl_jax.synthetic.anatomy import BRATS_SHAPE
from cmfl_jax.synthetic.subject import Phantom, make_subject

MODALITY_NAMES = ("T1", "T1c", "T2", "FLAIR")
# Label colours: 0 transparent, 1 NCR/NET red, 2 oedema green, 4 enhancing yellow.
LABEL_COLOURS = [(0, 0, 0, 0), (0.9, 0.1, 0.1, 0.75), (0.1, 0.85, 0.2, 0.55), (1, 0.9, 0, 0.8)]
LABEL_INDEX = np.array([0, 1, 2, 0, 3], np.uint8)  # label value -> colour index


def slices(volume: np.ndarray, centre: tuple[int, int, int]) -> list[tuple[str, np.ndarray, str]]:
    """Axial, coronal and sagittal slices in radiological display (patient's right on the left, top up).

    The arrays follow BraTS: axis 0 runs right to left, axis 1 anterior to posterior, axis 2 inferior to superior.
    """
    i, j, k = centre
    return [
        ("axial", volume[:, :, k].T, "upper"),
        ("coronal", volume[:, j, :].T, "lower"),
        ("sagittal", volume[i, :, :].T, "lower"),
    ]


def brain_box(brain: np.ndarray, margin: int = 3) -> tuple[slice, slice, slice]:
    """The brain's bounding box plus a margin: the pictures show the brain, not the empty field of view."""
    box = []
    for a in range(3):
        hit = np.nonzero(brain.any(axis=tuple(b for b in range(3) if b != a)))[0]
        box.append(slice(max(hit.min() - margin, 0), min(hit.max() + 1 + margin, brain.shape[a])))
    return tuple(box)  # type: ignore[return-value]


def wt_volume_cm3(ph: Phantom) -> float:
    """Whole-tumour volume in cm^3."""
    return float(np.count_nonzero(ph.label) * np.prod(ph.spacing) / 1000.0)


def draw(subjects: list[tuple[int, Phantom]], out: str) -> None:
    """Three rows per subject (axial, coronal, sagittal), a column per modality and one of labels on T1c."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    label_cmap = ListedColormap(LABEL_COLOURS)
    cols = len(MODALITY_NAMES) + 1
    rows = 3 * len(subjects)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), facecolor="black")
    for s, (seed, ph) in enumerate(subjects):
        brain = ph.images[0] > 0
        windows = [np.percentile(img[brain], [0.5, 99.7]) for img in ph.images]
        crop = brain_box(brain)
        images = ph.images[(slice(None), *crop)]
        colour = LABEL_INDEX[ph.label][crop]
        centre = tuple(c - b.start for c, b in zip(ph.centre, crop, strict=True))
        for v in range(3):
            row = 3 * s + v
            for ch in range(cols):
                ax = axes[row, ch]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_facecolor("black")
                base = images[1] if ch == 4 else images[ch]
                lo, hi = windows[1] if ch == 4 else windows[ch]
                view, image, origin = slices(base, centre)[v]
                ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin=origin, interpolation="nearest")
                if ch == 4:
                    _, lab, _ = slices(colour, centre)[v]
                    ax.imshow(lab, cmap=label_cmap, vmin=0, vmax=3, origin=origin, interpolation="nearest")
                title = f"{MODALITY_NAMES[ch]}" if ch < 4 else "labels on T1c"
                if v == 0:
                    title = f"seed {seed} {ph.grade}: {title}"
                ax.set_title(title, color="white", fontsize=8)
                if ch == 0:
                    ax.set_ylabel(view, color="white", fontsize=8)
    fig.text(0.5, 0.002, "labels: red NCR/NET (1), green oedema (2), yellow enhancing (4); radiological view",
             color="white", ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.01, 1, 1))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=75, facecolor="black", format="png")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """Make the subjects, print their tumour volumes and draw the montage."""
    parser = argparse.ArgumentParser(prog="python -m cmfl_jax.synthetic.montage", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="subject seeds")
    parser.add_argument("--lgg", default="2", help="seeds to force LGG-like (others HGG); '' lets the seed decide")
    parser.add_argument("--shape", default=",".join(map(str, BRATS_SHAPE)))
    parser.add_argument("--out", default=os.path.join("docs", "phantom_montage.png"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    lgg_seeds = {int(s) for s in args.lgg.split(",") if s}
    shape = tuple(int(s) for s in args.shape.split(","))
    subjects = []
    for seed in seeds:
        start = time.perf_counter()
        ph = make_subject(seed, shape, lgg=(seed in lgg_seeds) if args.lgg else None)
        took = time.perf_counter() - start
        counts = {v: int(np.count_nonzero(ph.label == v)) for v in (1, 2, 4)}
        vox = float(np.prod(ph.spacing)) / 1000.0
        print(f"seed {seed}: {ph.grade}, WT {wt_volume_cm3(ph):.1f} cm^3 (NCR {counts[1] * vox:.1f}, "
              f"ED {counts[2] * vox:.1f}, ET {counts[4] * vox:.1f}), ET present: {counts[4] > 0}, "
              f"made in {took:.1f} s")
        subjects.append((seed, ph))
    draw(subjects, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
