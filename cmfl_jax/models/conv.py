"""The one 3D convolution helper every module uses, with an exact fast path for CPU.

XLA's CPU 3D convolution is slow (its gradient most of all). ``conv_impl="cpu_fast"`` computes the same
numbers another way:

* a stride-1 k^3 convolution (odd or even k) as the sum over kernel depth of 2D convolutions of depth slices;
* a 1^3 convolution as a matrix product;
* a strided convolution (stride s, kernel k; the PatchGAN's 4^3 stride 2) by space-to-depth, then a stride-1
  VALID conv with the ceil(k/s)^3 folded kernel (:func:`_space_to_depth_conv`);
* the 2^3 stride-2 transposed convolution as a 1^3 convolution to 8*C channels followed by depth-to-space.

``"onednn"`` runs every :class:`Conv3D` (forward and both gradients) on the CPU by oneDNN through XLA FFI custom
calls (:mod:`cmfl_jax.models.onednn`; float32, bfloat16 where the CPU runs oneDNN's bfloat16 kernels, static
shapes; anything else, and :class:`UpConv3D`, takes ``cpu_fast``), when the library was built and loads; else
``cpu_fast``. Inside :func:`pure_xla` (``jax.export`` bundles) it is ``cpu_fast``, so an exported program holds no
custom call.

``"native"`` is XLA's own op (right on GPU and TPU). ``"auto"`` (and ``"onednn"``) stages out both inside one
program, ``jax.lax.platform_dependent(cpu=cpu_fast, default=native)``, the CPU branch ``onednn`` when
:data:`ONEDNN_IN_AUTO` and the library is loaded: a program lowered for one platform holds that platform's branch
only; one exported for several (``jax.export``, ``platforms=("cpu", "cuda", "tpu")``) carries both and picks where
it is compiled. Nothing asks ``jax.default_backend()``, so a CPU-only machine lowers the GPU/TPU program
(``tests/test_lowering.py``). Every implementation declares the same params (``kernel`` ``(k, k, k, C_in, C_out)``,
``bias``): checkpoints are interchangeable. Timings: docs/performance.md ("Convolutions").
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from cmfl_jax.models import onednn

CONV_IMPLS = ("native", "cpu_fast", "onednn", "auto")
_DN = ("NDHWC", "DHWIO", "NDHWC")
# Whether ``auto`` runs oneDNN on the CPU (when the library is loaded): only where it measured faster than cpu_fast
# (docs/performance.md; experiments/onednn_bench.py, removed, is in the git history up to commit 36a1f11).
ONEDNN_IN_AUTO = True
_PURE_XLA = [False]


@contextlib.contextmanager
def pure_xla():
    """Inside, ``onednn`` and ``auto`` trace ``cpu_fast`` on the CPU: no custom call (for ``jax.export``)."""
    before = _PURE_XLA[0]
    _PURE_XLA[0] = True
    try:
        yield
    finally:
        _PURE_XLA[0] = before


def _use_onednn(conv_impl: str) -> bool:
    """Whether this trace's CPU branch of ``conv_impl`` is oneDNN (the library loads, not inside pure_xla)."""
    wanted = conv_impl == "onednn" or (conv_impl == "auto" and ONEDNN_IN_AUTO)
    return wanted and not _PURE_XLA[0] and onednn.available()


def resolve_conv_impl(conv_impl: str, platform: str | None = None) -> str:
    """The implementation ``conv_impl`` runs on ``platform`` (default: JAX's default backend), for reports only.

    ``auto`` -> ``cpu_fast`` (``onednn`` when :data:`ONEDNN_IN_AUTO` and the library loads) on CPU, ``native``
    elsewhere; ``onednn`` -> ``onednn`` on CPU when the library loads, else ``cpu_fast``; ``native`` elsewhere.
    The modules never call this with ``auto``: they stage both branches out (:func:`_dispatch`) and the platform
    the program is lowered for decides.
    """
    _check_conv_impl(conv_impl)
    if conv_impl in ("auto", "onednn"):
        if (platform or jax.default_backend()) != "cpu":
            return "native"
        return "onednn" if _use_onednn(conv_impl) else "cpu_fast"
    return conv_impl


def _check_conv_impl(conv_impl: str) -> None:
    if conv_impl not in CONV_IMPLS:
        from cmfl_jax.errors import CMFLError

        raise CMFLError("config.model.conv_impl", f"unknown value {conv_impl!r}; choose one of {CONV_IMPLS}")


def _dispatch(conv_impl: str, cpu_fast: Callable, native: Callable, *args: jax.Array) -> jax.Array:
    """``cpu_fast(*args)`` or ``native(*args)``; for ``auto`` and ``onednn`` both, chosen per platform by the
    lowering (the caller passes its oneDNN function as ``cpu_fast`` when :func:`_use_onednn`)."""
    _check_conv_impl(conv_impl)
    if conv_impl == "cpu_fast":
        return cpu_fast(*args)
    if conv_impl == "native":
        return native(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu_fast, default=native)


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


# After space-to-depth, the stride-1 conv is a matrix product (`_conv_valid_as_matmul`) when the folded input
# has at least this many channels and voxels (matrix columns and rows), else the 2D-slice sum
# (`_conv_3d_as_2d`), which measured faster for a skinny or small product (docs/performance.md, "Convolutions").
MATMUL_MIN_CHANNELS = 32
MATMUL_MIN_VOXELS = 4096


def _conv_valid_as_matmul(x, kernel):
    """Stride-1 VALID 3D conv as one matrix product to ``k^3 * F`` channels plus a sum of ``k^3`` shifted slices.

    ``out[v] = sum_t x[v + t] K[t] = sum_t (x @ K[t])[v + t]``: the product ``x (M, C) @ [K[t]]_t (C, k^3 F)``
    runs at matrix-multiply speed, and its transpose (the gradient) is two more plain matrix products.
    """
    k, c, f = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    n, d, h, w, _ = x.shape
    o = (d - k + 1, h - k + 1, w - k + 1)
    y = (x.reshape(-1, c) @ kernel.transpose(3, 0, 1, 2, 4).reshape(c, k**3 * f)).reshape(n, d, h, w, k**3, f)
    shifts = [(a, b, e) for a in range(k) for b in range(k) for e in range(k)]
    slices = [y[:, a : a + o[0], b : b + o[1], e : e + o[2], t] for t, (a, b, e) in enumerate(shifts)]
    out = slices[0]
    for part in slices[1:]:
        out = out + part
    return out


def _space_to_depth(x, kernel, stride, pad):
    """Input and kernel of :func:`_space_to_depth_conv`'s stride-1 VALID conv (see there)."""
    s, k = stride, kernel.shape[0]
    kq = -(-k // s)
    n, c, f = x.shape[0], x.shape[-1], kernel.shape[-1]
    lengths = [s * ((size + 2 * pad - k) // s + kq) for size in x.shape[1:4]]  # s * (out + kq - 1)
    # Zero-pad by `pad` on the left and enough on the right, then cut every axis to the length above.
    x = jnp.pad(x, [(0, 0)] + [(pad, max(pad, ln - pad - size)) for ln, size in zip(lengths, x.shape[1:4],
                                                                                       strict=True)] + [(0, 0)])
    x = x[:, : lengths[0], : lengths[1], : lengths[2]]
    dq, hq, wq = (ln // s for ln in lengths)
    x = x.reshape(n, dq, s, hq, s, wq, s, c).transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(n, dq, hq, wq, s**3 * c)
    kernel = jnp.pad(kernel, [(0, kq * s - k)] * 3 + [(0, 0), (0, 0)])
    kernel = kernel.reshape(kq, s, kq, s, kq, s, c, f).transpose(0, 2, 4, 1, 3, 5, 6, 7)
    return x, kernel.reshape(kq, kq, kq, s**3 * c, f)


def _space_to_depth_conv(x, kernel, stride, pad):
    """Strided 3D conv as space-to-depth + a stride-1 VALID conv (exact, same numbers as the native op).

    With ``a = stride*q + r`` a window offset, ``out[i] = sum_{q, r} xp[stride*(i + q) + r] K[stride*q + r]``:
    so fold each ``stride^3`` block of the padded input into channels (``(r_d, r_h, r_w, c)`` order),
    zero-pad the kernel edge up to ``kq*stride`` with ``kq = ceil(k/stride)`` and fold it the same way,
    and correlate with the resulting ``kq^3`` kernel at stride 1 (via :func:`_conv_valid_as_matmul`, or
    :func:`_conv_3d_as_2d` when the folded input is small: ``MATMUL_MIN_CHANNELS``, ``MATMUL_MIN_VOXELS``).
    The padded input is cut or zero-extended to ``stride*(out + kq - 1)`` per axis, which gives exactly the
    native output size ``floor((D + 2*pad - k)/stride) + 1`` (trailing voxels no window reaches are dropped).
    """
    x, kernel = _space_to_depth(x, kernel, stride, pad)
    n = x.shape[0] if isinstance(x.shape[0], int) else 1  # a symbolic batch (jax.export) counts as one
    if x.shape[-1] >= MATMUL_MIN_CHANNELS and n * math.prod(x.shape[1:4]) >= MATMUL_MIN_VOXELS:
        return _conv_valid_as_matmul(x, kernel)
    return _conv_3d_as_2d(x, kernel, 0)


class Conv3D(nn.Module):
    """A 3D convolution with symmetric zero padding.

    Attributes:
      features: output channels.
      kernel_size: cubic kernel edge.
      strides: cubic stride.
      padding: voxels of zero padding on every side.
      conv_impl: "native" | "cpu_fast" | "onednn" | "auto".
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
        s, p = self.strides, self.padding
        fast = functools.partial(_conv_3d_as_2d, pad=p) if s == 1 else functools.partial(_space_to_depth_conv,
                                                                                          stride=s, pad=p)
        if _use_onednn(self.conv_impl) and onednn.supports(x, kernel):
            fast = lambda x, kernel: onednn.conv(x, kernel, s, p)
        native = functools.partial(_conv_native, stride=s, pad=p)
        return _dispatch(self.conv_impl, fast, native, x, kernel) + bias


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
        return _dispatch(self.conv_impl, _up_conv_cpu_fast, _up_conv_native, x, kernel) + bias


def _up_conv_cpu_fast(x, kernel):
    """1^3 conv to 8*C_out channels, then depth-to-space."""
    n, d, h, w, _ = x.shape
    y = jnp.einsum("ndhwc,ijlcf->ndhwijlf", x, kernel)
    return y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, 2 * d, 2 * h, 2 * w, kernel.shape[-1])


def _up_conv_native(x, kernel):
    # lax.conv_transpose correlates with the kernel flipped; flip it to get the formula of UpConv3D.
    return jax.lax.conv_transpose(x, kernel[::-1, ::-1, ::-1], (2, 2, 2), "VALID", dimension_numbers=_DN)
