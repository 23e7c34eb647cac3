"""``conv_impl="onednn"``: 3D convolutions on the CPU by oneDNN, through XLA FFI custom calls.

``csrc/onednn_conv.cc`` is built by ``pip install -e .`` into ``cmfl_jax/_onednn_conv*.so`` (``setup.py``; it needs
a C++ compiler and, on Linux x86-64, the ``onednn-devel-cpu-gomp`` wheel's headers and library, a copy of whose
``libdnnl.so.3`` goes beside it). It holds three FFI handlers (forward, backward-data, backward-weights; float32,
and bfloat16 where the CPU runs oneDNN's bfloat16 convolutions: :func:`bf16_supported`) that take JAX's NDHWC
activations and DHWIO kernels as they are. :func:`conv` is the forward with a ``custom_vjp`` whose backward calls
the two gradient handlers. When the library is missing or fails to load, :func:`available` is False, one log line
says why and ``onednn``/``auto`` run ``cpu_fast`` (:mod:`cmfl_jax.models.conv`). ``CMFL_JAX_ONEDNN=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

TARGETS = {
    "cmfl_onednn_conv_fwd": "CmflOnednnConvForward",
    "cmfl_onednn_conv_bwd_data": "CmflOnednnConvBackwardData",
    "cmfl_onednn_conv_bwd_weights": "CmflOnednnConvBackwardWeights",
}
# 0: activations stay NDHWC (only the small kernel is reordered); 1: oneDNN's own blocked activation layout, every
# operand reordered in and out. 0 measured faster (docs/performance.md; by experiments/onednn_bench.py, removed,
# in the git history up to commit 36a1f11).
LAYOUT = 0
# oneDNN's OpenMP threads per call; 0: OpenMP's default (OMP_NUM_THREADS, else one per core).
THREADS = int(os.environ.get("CMFL_JAX_ONEDNN_THREADS", "0"))

_state: dict = {}


def _library_path() -> str:
    """``cmfl_jax/_onednn_conv<this interpreter's extension suffix>``, as ``pip install`` built it."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_onednn_conv" + suffix)
        if os.path.exists(path):
            return path
    raise OSError("cmfl_jax/_onednn_conv*.so was not built (pip install -e . needs a C++ compiler)")


def load() -> str | None:
    """Load and register the library once; returns why not (None when it is loaded). Logs one line on failure."""
    if "error" not in _state:
        _state["error"] = _load()
        if _state["error"]:
            logging.warning("cmfl_jax: oneDNN convolutions unavailable (%s); conv_impl 'onednn' and 'auto' run "
                            "cpu_fast", _state["error"])
    return _state["error"]


def _load() -> str | None:
    if os.environ.get("CMFL_JAX_ONEDNN", "1") == "0":
        return "CMFL_JAX_ONEDNN=0"
    try:
        path = _library_path()
        lib = ctypes.CDLL(path)
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        _state["bf16"] = bool(lib.CmflOnednnSupportsBf16())
    except Exception as err:  # a missing file, an unresolved symbol, a jaxlib without FFI: fall back
        return f"{type(err).__name__}: {err}"
    return None


def available() -> bool:
    return load() is None


def bf16_supported() -> bool:
    """Whether the library is loaded and oneDNN runs bfloat16 convolutions on this CPU (asked once, at load)."""
    return available() and _state.get("bf16", False)


def supports(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether :func:`conv` takes these operands: static shapes, float32 (or bfloat16 where
    :func:`bf16_supported`), the library loaded."""
    if not all(isinstance(d, int) for d in (*x.shape, *kernel.shape)) or x.dtype != kernel.dtype:
        return False
    return available() and (x.dtype == jnp.float32 or (x.dtype == jnp.bfloat16 and bf16_supported()))


def _call(target, shape, dtype, a, b, stride, pad):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype))(
        a, b, stride=np.int64(stride), padding=np.int64(pad), layout=np.int64(LAYOUT), threads=np.int64(THREADS))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, (stride,) * 3, [(pad, pad)] * 3)``, NDHWC/DHWIO, by oneDNN."""
    k = kernel.shape[:3]
    out = tuple((size + 2 * pad - kk) // stride + 1 for size, kk in zip(x.shape[1:4], k, strict=True))
    return _call("cmfl_onednn_conv_fwd", (x.shape[0], *out, kernel.shape[-1]), x.dtype, x, kernel, stride, pad)


def _conv_fwd(x, kernel, stride, pad):
    return conv(x, kernel, stride, pad), (x, kernel)


def _conv_bwd(stride, pad, res, g):
    x, kernel = res
    dx = _call("cmfl_onednn_conv_bwd_data", x.shape, x.dtype, g, kernel, stride, pad)
    dk = _call("cmfl_onednn_conv_bwd_weights", kernel.shape, kernel.dtype, x, g, stride, pad)
    return dx, dk


conv.defvjp(_conv_fwd, _conv_bwd)
