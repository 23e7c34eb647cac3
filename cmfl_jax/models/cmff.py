"""The CMFF segmentation network: branches S_A, S_B (U-Nets) and the fusion branch S_F."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmfl_jax.models.fusion import FusionBranch
from cmfl_jax.models.outputs import activation, output_channels
from cmfl_jax.models.unet import UNet3D

BRANCHES = ("fusion", "A", "B", "A+B")


class CMFFNet(nn.Module):
    """S_A on pair A, S_B on pair B, S_F on their features and predictions.

    ``__call__(a, b)`` takes the two ``(N, D, H, W, 2)`` pairs and returns a dict with the logits of
    the branches that run (``logits_a``, ``logits_b``, ``logits_f``; ``None`` for a branch that does
    not run) and ``probs``, the prediction of the chosen variant: S_F's probabilities ("fusion"), one
    branch's ("A", "B"), or the mean of the two branches' ("A+B"); probabilities are the softmax of 4
    classes or, with ``output="regions"``, the sigmoids of WT, TC, ET (:mod:`~cmfl_jax.models.outputs`).
    Submodules are named ``S_A``, ``S_B``, ``S_F``; ``S_A``/``S_B`` have the tree of a generator ``UNet3D``
    but for ``head``.

    Attributes:
      branches: "fusion" | "A" | "B" | "A+B" (Table 2).
      attention: "mask" | "cbam" | "none" (fusion only).
      output: "classes" (softmax; the paper) | "regions" (WT, TC, ET, sigmoids).
      num_classes: the classes of ``output="classes"`` (4: the paper's; the label set's, e.g. 5 with RC).
      base, depth, conv_impl, dtype, param_dtype: as :class:`UNet3D`.
    """

    branches: str = "fusion"
    attention: str = "mask"
    output: str = "classes"
    num_classes: int = 4
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
        channels, act = output_channels(self.output, self.num_classes), lambda logits: activation(logits, self.output)
        kw = dict(base=self.base, depth=self.depth, conv_impl=self.conv_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        out = {"logits_a": None, "logits_b": None, "logits_f": None}
        if self.branches in ("fusion", "A", "A+B"):
            out["logits_a"], feats_a = UNet3D(channels, **kw, name="S_A")(a)
        if self.branches in ("fusion", "B", "A+B"):
            out["logits_b"], feats_b = UNet3D(channels, **kw, name="S_B")(b)
        if self.branches == "fusion":
            probs_a, probs_b = act(out["logits_a"]), act(out["logits_b"])
            out["logits_f"] = FusionBranch(self.base, self.attention, channels, self.conv_impl, self.dtype,
                                           self.param_dtype, self.output, name="S_F")(feats_a, feats_b, probs_a,
                                                                                      probs_b)
            out["probs"] = act(out["logits_f"])
        elif self.branches == "A+B":
            out["probs"] = 0.5 * (act(out["logits_a"]) + act(out["logits_b"]))
        else:
            out["probs"] = act(out["logits_a" if self.branches == "A" else "logits_b"])
        return out
