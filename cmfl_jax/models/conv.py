"""The one 3D convolution helper every module uses, with an exact fast path for CPU.

XLA's CPU 3D convolution is slow. ``conv_impl="cpu_fast"`` computes the same numbers another way:
a stride-1 k^3 convolution as the sum over kernel depth of 2D convolutions of depth slices,
a 1^3 convolution as a matrix product, and the 2^3 stride-2 transposed convolution as a 1^3
convolution to 8*C channels followed by depth-to-space. ``"native"`` is XLA's own op (right on GPU
and TPU); ``"auto"`` picks ``cpu_fast`` on CPU and ``native`` elsewhere. Both implementations declare
the same params (``kernel`` ``(k, k, k, C_in, C_out)``, ``bias``), so checkpoints are interchangeable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

CONV_IMPLS = ("native", "cpu_fast", "auto")
_DN = ("NDHWC", "DHWIO", "NDHWC")


def resolve_conv_impl(conv_impl: str) -> str:
    """``auto`` -> ``cpu_fast`` on CPU, ``native`` on GPU/TPU."""
    if conv_impl not in CONV_IMPLS:
        from cmfl_jax.errors import CMFLError

        raise CMFLError("config.model.conv_impl", f"unknown value {conv_impl!r}; choose one of {CONV_IMPLS}")
    if conv_impl == "auto":
        return "cpu_fast" if jax.default_backend() == "cpu" else "native"
    return conv_impl


def _conv_native(x, kernel, stride, pad):
    return jax.lax.conv_general_dilated(x, kernel, (stride,) * 3, [(pad, pad)] * 3, dimension_numbers=_DN)


def _conv_3d_as_2d(x, kernel, pad):
    """Stride-1 3D conv: for each kernel depth, one 2D conv over all depth slices (batched into N)."""
    k = kernel.shape[0]
    n, d, h, w, c = x.shape
    if k == 1 and pad == 0:
        return jnp.einsum("ndhwc,cf->ndhwf", x, kernel[0, 0, 0])
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0), (0, 0)))
    d_out = d + 2 * pad - k + 1
    out = None
    for kd in range(k):
        slices = xp[:, kd : kd + d_out].reshape(n * d_out, h, w, c)
        y = jax.lax.conv_general_dilated(
            slices, kernel[kd], (1, 1), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        out = y if out is None else out + y
    return out.reshape(n, d_out, *out.shape[1:])


class Conv3D(nn.Module):
    """A 3D convolution with symmetric zero padding.

    Attributes:
      features: output channels.
      kernel_size: cubic kernel edge.
      strides: cubic stride.
      padding: voxels of zero padding on every side.
      conv_impl: "native" | "cpu_fast" | "auto" (strided convs always use the native op).
      dtype: compute dtype; param_dtype: storage dtype of kernel and bias.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int = 1
    conv_impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, k, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        if resolve_conv_impl(self.conv_impl) == "cpu_fast" and self.strides == 1:
            y = _conv_3d_as_2d(x, kernel, self.padding)
        else:
            y = _conv_native(x, kernel, self.strides, self.padding)
        return y + bias


class UpConv3D(nn.Module):
    """2^3 stride-2 transposed convolution: ``out[2d+i, 2h+j, 2w+l] = sum_c x[d, h, w, c] K[i, j, l, c]``.

    Attributes:
      features: output channels.
      conv_impl, dtype, param_dtype: as :class:`Conv3D`.
    """

    features: int
    conv_impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, 2, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        n, d, h, w, _ = x.shape
        if resolve_conv_impl(self.conv_impl) == "cpu_fast":
            # 1^3 conv to 8*C_out channels, then depth-to-space.
            y = jnp.einsum("ndhwc,ijlcf->ndhwijlf", x, kernel)
            y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, 2 * d, 2 * h, 2 * w, self.features)
        else:
            # lax.conv_transpose correlates with the kernel flipped; flip it to get the formula above.
            y = jax.lax.conv_transpose(x, kernel[::-1, ::-1, ::-1], (2, 2, 2), "VALID", dimension_numbers=_DN)
        return y + bias
