"""Builds the optional oneDNN convolution library ``cmfl_jax/_onednn_conv*.so`` (``csrc/onednn_conv.cc``).

Everything else is in pyproject.toml. ``pip install -e .`` (or ``pip install .``) compiles it with the C++
compiler present against the ``onednn-devel-cpu-gomp`` headers and library that pyproject.toml's
``[build-system] requires`` installs (Linux x86-64 only) and XLA's FFI headers (``csrc/third_party/xla``, from
jaxlib's ``jax.ffi.include_dir()``), and copies oneDNN's ``libdnnl.so.3`` beside it (found through its rpath
``$ORIGIN``), so nothing of oneDNN is needed at run time but GCC's ``libgomp.so.1``. The extension is optional:
with no compiler, no oneDNN wheel for the platform, or ``CMFL_JAX_BUILD_ONEDNN=0``, the package installs without
it and ``conv_impl="onednn"`` runs ``cpu_fast``.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DNNL = "libdnnl.so.3"


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
    ext = Extension(
        "cmfl_jax._onednn_conv", ["csrc/onednn_conv.cc"], language="c++",
        include_dirs=[include, "csrc/third_party"], library_dirs=[lib], libraries=["dnnl", "gomp"],
        extra_compile_args=["-std=c++17", "-O2", "-Wno-return-type"], extra_link_args=["-Wl,-rpath,$ORIGIN"],
        optional=True)
    ext.dnnl_dir = lib
    return [ext]


class BuildExt(build_ext):
    """build_ext that puts ``libdnnl.so.3`` beside the oneDNN extension once it is built (in the build folder,
    and in the source tree too for an editable install, where setuptools copies the extension back)."""

    def build_extension(self, ext):
        super().build_extension(ext)  # a compile error of an optional extension ends here (setuptools warns)
        if getattr(ext, "dnnl_dir", None):
            self._copy_dnnl(os.path.join(ext.dnnl_dir, DNNL), self._dnnl_beside(self.get_ext_fullpath(ext.name)))

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace, regular = self._get_inplace_equivalent(build_py, ext)
            if getattr(ext, "dnnl_dir", None) and os.path.exists(regular):
                self._copy_dnnl(self._dnnl_beside(regular), self._dnnl_beside(inplace))

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        for regular, inplace in list(mapping.items()):
            if os.path.basename(regular).startswith("_onednn_conv"):
                mapping[self._dnnl_beside(regular)] = self._dnnl_beside(inplace)
        return mapping

    @staticmethod
    def _dnnl_beside(path):
        return os.path.join(os.path.dirname(path), DNNL)

    @staticmethod
    def _copy_dnnl(source, target):
        try:
            shutil.copyfile(source, target)
        except OSError as err:  # the extension then fails to load, and the package runs cpu_fast
            print(f"cmfl_jax: {DNNL} not copied beside the oneDNN library ({err})")


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; the tests import it
    setup(ext_modules=onednn_extensions(), cmdclass={"build_ext": BuildExt})
