"""Grafting generator weights into segmentation branches."""

from __future__ import annotations

import numpy as np
import pytest

from cmfl_jax.errors import CMFLError
from cmfl_jax.training.cmft_init import graft_params


def trees():
    gen = {"enc_0": {"conv": {"kernel": np.ones((3, 3, 3, 2, 4))}}, "head": {"kernel": np.ones((1, 1, 1, 4, 2))}}
    seg = {"enc_0": {"conv": {"kernel": np.zeros((3, 3, 3, 2, 4))}}, "head": {"kernel": np.zeros((1, 1, 1, 4, 4))}}
    return gen, seg


def test_copies_all_but_the_head():
    gen, seg = trees()
    merged, copied = graft_params(gen, seg)
    assert copied == ["enc_0/conv/kernel"]
    np.testing.assert_array_equal(merged["enc_0"]["conv"]["kernel"], gen["enc_0"]["conv"]["kernel"])
    np.testing.assert_array_equal(merged["head"]["kernel"], seg["head"]["kernel"])


def test_shape_mismatch_and_missing_key_are_clear():
    gen, seg = trees()
    gen["enc_0"]["conv"]["kernel"] = np.ones((3, 3, 3, 2, 8))
    with pytest.raises(CMFLError, match=r"ckpt/7: parameter enc_0/conv/kernel has shape \(3, 3, 3, 2, 8\)"):
        graft_params(gen, seg, where="ckpt/7")
    del gen["enc_0"]
    with pytest.raises(CMFLError, match="checkpoint has no parameter enc_0/conv/kernel"):
        graft_params(gen, seg, where="ckpt/7")
