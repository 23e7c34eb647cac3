"""The 3D PatchGAN discriminator, exactly Table 1 of the paper."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmfl_jax.models.conv import Conv3D

FILTERS = (16, 32, 64, 128)


class PatchDiscriminator(nn.Module):
    """conv 4^3 stride 2 with 16, 32, 64, 128 filters (InstanceNorm on all but the first), LeakyReLU 0.2,
    then conv 4^3 stride 1 to one channel; padding 1. A 128^3 input gives 64^3x16, 32^3x32, 16^3x64,
    8^3x128 and 7^3x1 (sown as ``intermediates`` L1, L3, L6, L9, L12).

    Attributes:
      conv_impl: "native" | "cpu_fast" | "onednn" | "auto".
      dtype, param_dtype: compute and storage dtypes.
    """

    conv_impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if min(x.shape[1:4]) < 32:
            from cmfl_jax.errors import CMFLError

            raise CMFLError(None, f"discriminator input {tuple(x.shape[1:4])} is smaller than 32^3: Table 1's four "
                                  "stride-2 convs and the final 4^3 conv would leave no output (use patches >= 32)")
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        for i, (features, layer) in enumerate(zip(FILTERS, ("L1", "L3", "L6", "L9"), strict=True)):
            x = Conv3D(features, 4, 2, 1, **kw, name=f"conv_{i}")(x)
            self.sow("intermediates", layer, x)
            if i > 0:
                x = nn.InstanceNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        x = Conv3D(1, 4, 1, 1, **kw, name=f"conv_{len(FILTERS)}")(x)
        self.sow("intermediates", "L12", x)
        return x.astype(jnp.float32)
