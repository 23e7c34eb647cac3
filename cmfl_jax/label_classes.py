"""What the segmentation networks' output channels stand for, and the one way back to BraTS labels.

``config.model.output`` picks one of two heads:

* ``"classes"`` (the paper): 4 mutually exclusive classes under one softmax; class ``i`` is label
  ``CLASS_LABELS[i]``: background, NCR/NET (1), oedema (2), enhancing tumour (4).
* ``"regions"`` (nnU-Net's BraTS setup): 3 overlapping BraTS regions under independent sigmoids, channel ``i``
  is ``REGION_NAMES[i]``: WT = {1, 2, 4}, TC = {1, 4}, ET = {4} (:data:`REGION_LABELS`).

:func:`probs_to_labels` is the one conversion from either kind of probabilities to a 0/1/2/4 label map, used by
validation, prediction (params and StableHLO) and the previews.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cmfl_jax.errors import CMFLError

CLASS_LABELS = (0, 1, 2, 4)
NUM_CLASSES = len(CLASS_LABELS)
REGION_NAMES = ("WT", "TC", "ET")
REGION_LABELS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
OUTPUTS = ("classes", "regions")


def check_output(output: str) -> str:
    """``output`` if it is one of :data:`OUTPUTS`, else a one-line ``config.model.output`` error."""
    if output not in OUTPUTS:
        raise CMFLError("config.model.output", f"unknown value {output!r}; choose one of {OUTPUTS}")
    return output


def labels_to_classes(label):
    """0/1/2/4 label map -> class indices 0..3 (works on numpy and jax arrays)."""
    xp = jnp if not isinstance(label, np.ndarray) else np
    return xp.where(label == 4, 3, label).astype(xp.int32)


def classes_to_labels(classes: np.ndarray) -> np.ndarray:
    """Class indices 0..3 -> 0/1/2/4 label map (uint8)."""
    return np.asarray(CLASS_LABELS, np.uint8)[np.asarray(classes)]


def labels_to_regions(label):
    """0/1/2/4 label map ``(...)`` -> float32 region targets ``(..., 3)``: WT, TC, ET (numpy or jax arrays)."""
    xp = jnp if not isinstance(label, np.ndarray) else np
    masks = [xp.isin(label, xp.asarray(REGION_LABELS[r])) for r in REGION_NAMES]
    return xp.stack(masks, axis=-1).astype(xp.float32)


def regions_to_labels(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Region probabilities ``(..., 3)`` -> 0/1/2/4 label map (uint8), nested as nnU-Net's BraTS does.

    Each region above ``threshold`` overwrites the previous: 2 where WT, then 1 where TC, then 4 where ET. So
    a TC or ET voxel outside the predicted WT still counts (TC wins over WT, ET over both): the regions are
    not forced to nest, the later, smaller region decides.
    """
    on = np.asarray(probs) > threshold
    label = np.zeros(on.shape[:-1], np.uint8)
    for channel, value in ((0, 2), (1, 1), (2, 4)):  # WT -> 2, TC -> 1, ET -> 4
        label[on[..., channel]] = value
    return label


def label_targets(label, output: str):
    """The training targets of a 0/1/2/4 label map: one-hot classes ``(..., 4)`` or regions ``(..., 3)``."""
    if check_output(output) == "regions":
        return labels_to_regions(label)
    return jax.nn.one_hot(labels_to_classes(label), NUM_CLASSES)


def probs_to_labels(probs: np.ndarray, output: str) -> np.ndarray:
    """0/1/2/4 label map (uint8) of the network's probabilities: argmax of the classes, or the nested regions."""
    if check_output(output) == "regions":
        return regions_to_labels(probs)
    return classes_to_labels(np.argmax(probs, axis=-1))
