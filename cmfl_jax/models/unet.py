"""The 3D U-Net of Fig. 3: generator (2 -> 2, linear) and segmentation branch (2 -> 4 classes) in one module."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmfl_jax.errors import CMFLError
from cmfl_jax.models.conv import Conv3D, UpConv3D

LEAKY_SLOPE = 0.01


class ConvBlock(nn.Module):
    """Two (3^3 conv + InstanceNorm + LeakyReLU); returns (output, activation of the first conv).

    Attributes:
      features: channels of both convs.
      conv_impl, dtype, param_dtype: as :class:`~cmfl_jax.models.conv.Conv3D`.
    """

    features: int
    conv_impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        outs = []
        for i in range(2):
            x = Conv3D(self.features, 3, 1, 1, self.conv_impl, self.dtype, self.param_dtype, name=f"conv_{i}")(x)
            x = nn.InstanceNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{i}")(x)
            x = nn.leaky_relu(x, LEAKY_SLOPE)
            outs.append(x)
        return outs[1], outs[0]


class UNet3D(nn.Module):
    """3D U-Net, channels last ``(N, D, H, W, C)``.

    Per level two 3^3 conv + InstanceNorm + LeakyReLU; 2^3 max-pool down-sampling; filters doubled
    after every down-sampling; 2^3 stride-2 transposed-conv up-sampling with skip concatenation; a
    final 1^3 conv ``head`` (linear output). Every param but ``head`` has the same shape whatever
    ``out_channels`` is, so generator weights graft into a segmentation branch.

    Attributes:
      out_channels: 2 for a generator (a modality pair), 4 for a segmentation branch (classes).
      base: filters of the first level.
      depth: number of down-samplings; spatial sizes must be multiples of ``2**depth``.
      conv_impl: "native" | "cpu_fast" | "onednn" | "auto".
      dtype: compute dtype (bfloat16 for mixed precision); the output is float32.
      param_dtype: storage dtype of the params.

    Returns ``(output, (feat_second_last, feat_last))``: the features of the last two conv layers at
    full resolution (inputs of the fusion branch).
    """

    out_channels: int
    base: int = 16
    depth: int = 4
    conv_impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        factor = 2**self.depth
        if any(s % factor for s in x.shape[1:4]):
            raise CMFLError(None, f"input size {tuple(x.shape[1:4])} is not a multiple of 2**depth = {factor} "
                                  f"(depth {self.depth}); pad the input or choose another patch size")
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        skips = []
        for level in range(self.depth):
            x, _ = ConvBlock(self.base * 2**level, **kw, name=f"enc_{level}")(x)
            skips.append(x)
            x = nn.max_pool(x, (2, 2, 2), (2, 2, 2))
        x, _ = ConvBlock(self.base * 2**self.depth, **kw, name="bottleneck")(x)
        for level in reversed(range(self.depth)):
            x = UpConv3D(self.base * 2**level, **kw, name=f"up_{level}")(x)
            x = jnp.concatenate([x, skips[level]], axis=-1)
            x, first = ConvBlock(self.base * 2**level, **kw, name=f"dec_{level}")(x)
        out = Conv3D(self.out_channels, 1, 1, 0, **kw, name="head")(x)
        return out.astype(jnp.float32), (first, x)
