"""Builds the optional oneDNN convolution library ``cmfl_jax/_onednn_conv*.so`` (``csrc/onednn_conv.cc``).

Everything else is in pyproject.toml. ``pip install -e .`` (or ``pip install .``) compiles it with the C++
compiler present against the ``onednn-devel-cpu-gomp`` headers that pyproject.toml's ``[build-system] requires``
installs (Linux x86-64 only) and XLA's FFI headers (``csrc/third_party/xla``, from jaxlib's
``jax.ffi.include_dir()``). The extension is optional: with no compiler, no oneDNN wheel for the platform, or
``CMFL_JAX_BUILD_ONEDNN=0``, the package installs without it and ``conv_impl="onednn"`` runs ``cpu_fast``.
"""

from __future__ import annotations

import importlib.metadata
import os

from setuptools import Extension, setup


def _dist_dir(dist: str, tail: str) -> str:
    """The folder that holds ``tail`` (a path ending) among the files of the installed distribution ``dist``."""
    d = importlib.metadata.distribution(dist)
    for f in d.files or ():
        path = str(d.locate_file(f))
        if path.endswith(tail):
            return path[: -len(tail)].rstrip("/")
    raise FileNotFoundError(f"{tail} is not in {dist}")


def onednn_extensions() -> list[Extension]:
    if os.environ.get("CMFL_JAX_BUILD_ONEDNN", "1") == "0":
        print("cmfl_jax: CMFL_JAX_BUILD_ONEDNN=0, the oneDNN convolution library is not built")
        return []
    try:
        include = _dist_dir("onednn-devel-cpu-gomp", "/oneapi/dnnl/dnnl.hpp")
        lib = _dist_dir("onednn-cpu-gomp", "/libdnnl.so")
    except Exception as err:  # no wheel for this platform: install without the library
        print(f"cmfl_jax: the oneDNN convolution library is not built ({type(err).__name__}: {err})")
        return []
    return [Extension(
        "cmfl_jax._onednn_conv", ["csrc/onednn_conv.cc"], language="c++",
        include_dirs=[include, "csrc/third_party"], library_dirs=[lib], libraries=["dnnl", "gomp"],
        extra_compile_args=["-std=c++17", "-O2", "-Wno-return-type"], optional=True)]


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; the tests import it
    setup(ext_modules=onednn_extensions())
