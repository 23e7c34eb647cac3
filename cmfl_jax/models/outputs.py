"""The segmentation heads' output kind (``config.model.output``): channels, activation, tumour mask.

``"classes"``: 4 mutually exclusive classes (background, NCR/NET, oedema, ET) under a softmax (the paper).
``"regions"``: 3 overlapping BraTS regions (WT, TC, ET, in that channel order) under independent sigmoids.
The label conversions live in :mod:`cmfl_jax.label_classes` (models import nothing of the package but errors).
"""

from __future__ import annotations

import jax

OUTPUT_CHANNELS = {"classes": 4, "regions": 3}


def output_channels(output: str) -> int:
    """Head channels of ``output``; a one-line ``config.model.output`` error for an unknown kind."""
    if output not in OUTPUT_CHANNELS:
        from cmfl_jax.errors import CMFLError

        raise CMFLError("config.model.output", f"unknown value {output!r}; choose one of {tuple(OUTPUT_CHANNELS)}")
    return OUTPUT_CHANNELS[output]


def activation(logits: jax.Array, output: str) -> jax.Array:
    """Probabilities of a head's logits: softmax over the classes, or a sigmoid per region."""
    return jax.nn.sigmoid(logits) if output == "regions" else jax.nn.softmax(logits)


def tumour_mask(probs: jax.Array, output: str) -> jax.Array:
    """``(..., 1)`` tumour probability for the mask-guided attention: ``1 - p[background]`` of the classes, or
    ``p[WT]`` of the regions (channel 0 either way)."""
    return probs[..., :1] if output == "regions" else 1.0 - probs[..., :1]
