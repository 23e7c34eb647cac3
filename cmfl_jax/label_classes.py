"""The segmentation networks' 4 output classes and the BraTS labels they stand for.

Class ``i`` of a softmax output is label ``CLASS_LABELS[i]``: background, NCR/NET (1), oedema (2),
enhancing tumour (4). The classes are mutually exclusive, so one softmax covers them; the BraTS
regions (WT, TC, ET) are unions of classes and are formed only for evaluation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

CLASS_LABELS = (0, 1, 2, 4)
NUM_CLASSES = len(CLASS_LABELS)


def labels_to_classes(label):
    """0/1/2/4 label map -> class indices 0..3 (works on numpy and jax arrays)."""
    xp = jnp if not isinstance(label, np.ndarray) else np
    return xp.where(label == 4, 3, label).astype(xp.int32)


def classes_to_labels(classes: np.ndarray) -> np.ndarray:
    """Class indices 0..3 -> 0/1/2/4 label map (uint8)."""
    return np.asarray(CLASS_LABELS, np.uint8)[np.asarray(classes)]
