"""The CMFF segmentation network: branches S_A, S_B (U-Nets) and the fusion branch S_F."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmfl_jax.models.fusion import FusionBranch
from cmfl_jax.models.unet import UNet3D

BRANCHES = ("fusion", "A", "B", "A+B")


class CMFFNet(nn.Module):
    """S_A on pair A, S_B on pair B, S_F on their features and predictions.

    ``__call__(a, b)`` takes the two ``(N, D, H, W, 2)`` pairs and returns a dict with the logits of
    the branches that run (``logits_a``, ``logits_b``, ``logits_f``; ``None`` for a branch that does
    not run) and ``probs``, the prediction of the chosen variant: S_F's softmax ("fusion"), one
    branch's ("A", "B"), or the mean of the two branches' softmax maps ("A+B"). Submodules are named
    ``S_A``, ``S_B``, ``S_F``; ``S_A``/``S_B`` have the tree of a generator ``UNet3D`` but for ``head``.

    Attributes:
      branches: "fusion" | "A" | "B" | "A+B" (Table 2).
      attention: "mask" | "cbam" | "none" (fusion only).
      base, depth, conv_impl, dtype, param_dtype: as :class:`UNet3D`.
    """

    branches: str = "fusion"
    attention: str = "mask"
    base: int = 16
    depth: int = 4
    conv_impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> dict:
        if self.branches not in BRANCHES:
            from cmfl_jax.errors import CMFLError

            raise CMFLError("config.model.branches", f"unknown value {self.branches!r}; choose one of {BRANCHES}")
        kw = dict(base=self.base, depth=self.depth, conv_impl=self.conv_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        out = {"logits_a": None, "logits_b": None, "logits_f": None}
        if self.branches in ("fusion", "A", "A+B"):
            out["logits_a"], feats_a = UNet3D(4, **kw, name="S_A")(a)
        if self.branches in ("fusion", "B", "A+B"):
            out["logits_b"], feats_b = UNet3D(4, **kw, name="S_B")(b)
        if self.branches == "fusion":
            probs_a, probs_b = jax.nn.softmax(out["logits_a"]), jax.nn.softmax(out["logits_b"])
            out["logits_f"] = FusionBranch(self.base, self.attention, 4, self.conv_impl, self.dtype,
                                           self.param_dtype, name="S_F")(feats_a, feats_b, probs_a, probs_b)
            out["probs"] = jax.nn.softmax(out["logits_f"])
        elif self.branches == "A+B":
            out["probs"] = 0.5 * (jax.nn.softmax(out["logits_a"]) + jax.nn.softmax(out["logits_b"]))
        else:
            out["probs"] = jax.nn.softmax(out["logits_a" if self.branches == "A" else "logits_b"])
        return out
