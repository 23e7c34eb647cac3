"""What the segmentation networks' output channels stand for, and the one way back to BraTS labels.

``config.model.output`` picks one of two heads:

* ``"classes"`` (the paper): mutually exclusive classes under one softmax; class ``i`` is internal label
  ``classes[i]`` of the run's label set (:attr:`cmfl_jax.label_sets.LabelSet.classes`), by default
  ``CLASS_LABELS``: background, NCR/NET (1), oedema (2), enhancing tumour (4); a fifth, resection cavity (5),
  for BraTS 2024 GLI post-treatment; ET, NET, CC, ED for BraTS 2024 PED.
* ``"regions"`` (nnU-Net's BraTS setup): 3 overlapping BraTS regions under independent sigmoids, channel ``i``
  is ``REGION_NAMES[i]``: WT = {1, 2, 4}, TC = {1, 4}, ET = {4} (:data:`REGION_LABELS`); only for the label
  sets whose classes are 0/1/2/4 (:func:`check_output_classes`).

:func:`probs_to_labels` is the one conversion from either kind of probabilities to a 0/1/2/4 label map, used by
validation, prediction (params and StableHLO) and the previews. Every function takes the ``classes`` of the
run's label set and defaults to 0/1/2/4.
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


def check_output_classes(output: str, classes: tuple[int, ...], label_set: str = "") -> str:
    """``output`` if its head fits the classes: the 3 nested regions only describe the 0/1/2/4 sets."""
    if check_output(output) == "regions" and tuple(classes) != CLASS_LABELS:
        raise CMFLError("config.model.output", f"'regions' (WT/TC/ET) needs a label set of classes 0/1/2/4 "
                                               f"(brats2021, brats2023), not {label_set or tuple(classes)}")
    return output


def _class_table(classes: tuple[int, ...]) -> np.ndarray:
    table = np.zeros(256, np.int32)
    table[np.asarray(classes)] = np.arange(len(classes))
    return table


def labels_to_classes(label, classes: tuple[int, ...] = CLASS_LABELS):
    """Internal label map -> class indices ``0..len(classes)-1`` (works on numpy and jax arrays)."""
    if not isinstance(label, np.ndarray):
        return jnp.asarray(_class_table(tuple(classes)))[label.astype(jnp.int32)]
    return _class_table(tuple(classes))[label.astype(np.int64)]


def classes_to_labels(classes: np.ndarray, labels: tuple[int, ...] = CLASS_LABELS) -> np.ndarray:
    """Class indices -> internal label map (uint8): index ``i`` becomes ``labels[i]``."""
    return np.asarray(labels, np.uint8)[np.asarray(classes)]


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


def label_targets(label, output: str, classes: tuple[int, ...] = CLASS_LABELS):
    """The training targets of an internal label map: one-hot classes ``(..., len(classes))`` or regions
    ``(..., 3)``."""
    if check_output(output) == "regions":
        return labels_to_regions(label)
    return jax.nn.one_hot(labels_to_classes(label, classes), len(classes))


def probs_to_labels(probs: np.ndarray, output: str, classes: tuple[int, ...] = CLASS_LABELS) -> np.ndarray:
    """Internal label map (uint8) of the network's probabilities: argmax of the classes, or the nested regions."""
    if check_output(output) == "regions":
        return regions_to_labels(probs)
    return classes_to_labels(np.argmax(probs, axis=-1), classes)
