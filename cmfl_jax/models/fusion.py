"""The cross-modality fusion branch S_F with the mask-guided attention block (section 3.2, Fig. 4)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmfl_jax.models.conv import Conv3D
from cmfl_jax.models.outputs import tumour_mask
from cmfl_jax.models.unet import LEAKY_SLOPE

ATTENTIONS = ("mask", "cbam", "none")


class FusionBranch(nn.Module):
    """Fuse the last-two-layer features of S_A and S_B, re-weight them, predict 4 classes (or 3 regions).

    Two (3^3 conv + InstanceNorm + LeakyReLU) fuse the concatenated features ``F``; then
    - ``attention="mask"`` (the paper's mask-guided attention): with the tumour masks *predicted by the
      branches*, ``m_A = 1 - p_A[background]`` and ``m_B = 1 - p_B[background]``,
      ``F' = F + F * m_A + F * m_B``; with ``output="regions"`` the masks are the predicted WT,
      ``m_A = p_A[WT]``, ``m_B = p_B[WT]``;
    - ``"cbam"`` (the paper's "w CA"): conventional channel + spatial attention computed from ``F``, with
      CBAM's own settings (reduction ratio 16, a 7^3 spatial kernel);
    - ``"none"`` ("w/o MG"): ``F' = F``; the predictions are not used at all.
    One more conv block and a final 1^3 conv give the ``num_classes`` logits. The predictions enter *only*
    through the attention, so "none" ignores them.

    Attributes:
      features: channels of the fusion convs.
      attention: "mask" | "cbam" | "none".
      num_classes: output channels (4 classes, or 3 regions).
      conv_impl, dtype, param_dtype: as :class:`~cmfl_jax.models.conv.Conv3D`.
      output: "classes" | "regions": how the branches' probabilities give the tumour masks.
    """

    features: int = 16
    attention: str = "mask"
    num_classes: int = 4
    conv_impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    output: str = "classes"

    def _block(self, x, name):
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv3D(self.features, 3, 1, 1, **kw, name=f"{name}_conv")(x)
        x = nn.InstanceNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"{name}_norm")(x)
        return nn.leaky_relu(x, LEAKY_SLOPE)

    @nn.compact
    def __call__(self, feats_a, feats_b, probs_a: jax.Array, probs_b: jax.Array) -> jax.Array:
        if self.attention not in ATTENTIONS:
            from cmfl_jax.errors import CMFLError

            raise CMFLError("config.model.attention", f"unknown value {self.attention!r}; choose one of {ATTENTIONS}")
        x = jnp.concatenate([*feats_a, *feats_b], axis=-1)
        x = self._block(x, "fuse_0")
        x = self._block(x, "fuse_1")
        if self.attention == "mask":
            m_a, m_b = tumour_mask(probs_a, self.output), tumour_mask(probs_b, self.output)
            x = x + x * m_a + x * m_b
        elif self.attention == "cbam":
            x = self._cbam(x)
        x = self._block(x, "out")
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        return Conv3D(self.num_classes, 1, 1, 0, **kw, name="head")(x).astype(jnp.float32)

    def _cbam(self, x):
        """CBAM (Woo et al. 2018) with its own settings: channel attention from average- and max-pooled features
        through a shared MLP of reduction ratio 16, then spatial attention from a 7^3 conv (padding 3) of the
        channel-pooled maps (the paper's 7x7 made 3D)."""
        hidden = max(self.features // 16, 1)
        mlp_1 = nn.Dense(hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="ca_dense_0")
        mlp_2 = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="ca_dense_1")
        pooled = [jnp.mean(x, axis=(1, 2, 3)), jnp.max(x, axis=(1, 2, 3))]
        channel = jax.nn.sigmoid(sum(mlp_2(nn.relu(mlp_1(p))) for p in pooled))
        x = x * channel[:, None, None, None, :]
        maps = jnp.concatenate([jnp.mean(x, -1, keepdims=True), jnp.max(x, -1, keepdims=True)], -1)
        spatial = Conv3D(1, 7, 1, 3, self.conv_impl, self.dtype, self.param_dtype, name="sa_conv")(maps)
        return x * jax.nn.sigmoid(spatial)
