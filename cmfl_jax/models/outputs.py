"""The segmentation heads' output kind (``config.model.output``): channels, activation, tumour mask.

``"classes"``: mutually exclusive classes under a softmax (the paper: 4, background, NCR/NET, oedema, ET; the
label set decides, e.g. 5 with the resection cavity of BraTS 2024 GLI post-treatment).
``"regions"``: 3 overlapping BraTS regions (WT, TC, ET, in that channel order) under independent sigmoids.
The label conversions live in :mod:`cmfl_jax.label_classes` (models import nothing of the package but errors).
"""

from __future__ import annotations

import jax

OUTPUT_CHANNELS = {"classes": 4, "regions": 3}


def output_channels(output: str, num_classes: int = 4) -> int:
    """Head channels of ``output`` (``num_classes`` for classes); a one-line ``config.model.output`` error for an
    unknown kind."""
    if output not in OUTPUT_CHANNELS:
        from cmfl_jax.errors import CMFLError

        raise CMFLError("config.model.output", f"unknown value {output!r}; choose one of {tuple(OUTPUT_CHANNELS)}")
    return num_classes if output == "classes" else OUTPUT_CHANNELS[output]


def activation(logits: jax.Array, output: str) -> jax.Array:
    """Probabilities of a head's logits: softmax over the classes, or a sigmoid per region."""
    return jax.nn.sigmoid(logits) if output == "regions" else jax.nn.softmax(logits)


def tumour_mask(probs: jax.Array, output: str) -> jax.Array:
    """``(..., 1)`` tumour probability for the mask-guided attention: ``1 - p[background]`` of the classes, or
    ``p[WT]`` of the regions (channel 0 either way)."""
    return probs[..., :1] if output == "regions" else 1.0 - probs[..., :1]
