"""Modality pairs (section 3.3): each "modality" of the method is a 2-channel pair of MRI sequences."""

from __future__ import annotations

from cmfl_jax.errors import CMFLError

# Channel indices into (T1, T1c, T2, FLAIR) for pair A and pair B.
PAIRINGS = {
    "t1-t1ce/t2-flair": ((0, 1), (2, 3)),  # the paper's pairing (Fig. 5)
    "t1-flair/t2-t1ce": ((0, 3), (2, 1)),  # the alternative of Table 4
}


def pair_channels(pairing: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(channels of A, channels of B) for a pairing name."""
    if pairing not in PAIRINGS:
        raise CMFLError("config.data.pairing", f"unknown pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
    return PAIRINGS[pairing]


def split_pairs(image, pairing: str):
    """``(..., 4)`` channels-last image -> (pair A, pair B), each ``(..., 2)``."""
    a, b = pair_channels(pairing)
    return image[..., list(a)], image[..., list(b)]
