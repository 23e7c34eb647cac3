"""Shared fixtures: a private cache folder per test, and tiny hand-made BraTS trees."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from absl import flags

from cmfl_jax.data.io import write_nifti
from cmfl_jax.data.layouts import Subject, subject_file_paths, to_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SHAPE = (20, 22, 24)

# Tests compile far more than they run (tiny volumes, a few steps each). XLA's backend optimisation and its
# MLIR fusion emitters take half of a CMFT step's compile time on CPU (22 s -> 11 s for the smoke CMFT
# step); what each test compares is computed under the same flags on both sides. XLA reads the variable
# when the backend starts (first use, not import); the CLI subprocesses inherit it. Real runs use XLA's
# defaults.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join([*_flags, *(f for f in TEST_XLA_FLAGS if f.split("=")[0] not in " ".join(_flags))])

# Identical computations compiled by several tests (or CI runs) are compiled once, in this process and in
# the CLI subprocesses (which inherit the variable; their data caches stay private per test).
COMPILE_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "cmfl_jax", "jax_tests")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", COMPILE_CACHE)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# grain's worker processes read absl flags; under pytest nobody parses them.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder, so nothing leaks between tests or into ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CMFL_JAX_CACHE", str(cache))
    return cache


def tiny_label(shape=TINY_SHAPE, with_et: bool = True) -> np.ndarray:
    """A cube tumour: NCR core, ET shell (if any), oedema around it."""
    label = np.zeros(shape, np.uint8)
    c = [s // 2 for s in shape]
    label[c[0] - 4 : c[0] + 4, c[1] - 4 : c[1] + 4, c[2] - 4 : c[2] + 4] = 2
    label[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2] = 4 if with_et else 1
    label[c[0] - 1 : c[0] + 1, c[1] - 1 : c[1] + 1, c[2] - 1 : c[2] + 1] = 1
    return label


def write_tiny_subject(root, layout: str, index: int, grade: str = "HGG", seed: int = 0, affine=None) -> Subject:
    """Write one small random subject (brain = all but a zero border) in a release layout."""
    rng = np.random.default_rng(seed * 1000 + index)
    subject = subject_file_paths(root, layout, index, grade)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine
    for path in subject.images:
        volume = (rng.normal(size=TINY_SHAPE) * 10 + 100).astype(np.float32)
        volume[:2] = 0  # background
        write_nifti(path, volume, affine)
    write_nifti(subject.label, to_dataset(tiny_label(), subject.et_label), affine)
    return subject


def write_tiny_dataset(root, n: int = 3, layout: str = "brats2018") -> list[Subject]:
    return [write_tiny_subject(root, layout, i, grade="LGG" if i % 3 == 2 else "HGG") for i in range(n)]


# The longest files first: pytest-xdist (``-n 2 --dist loadfile``, the README's test command) hands whole
# files to the workers in collection order, so a long file collected last would run alone at the end.
# The files in the order xdist should start them (--dist loadfile): the longest first, so that no worker is left
# with a long file at the end (from CI's --durations; refresh when a file grows).
LONGEST_FIRST = (
    "test_crash_resume", "test_mixed_precision", "test_device_check", "test_multiprocess", "test_notebook",
    "test_sharding", "test_cv", "test_cli", "test_predict", "test_split", "test_determinism", "test_cmft",
    "test_cmff_train", "test_preemption", "test_nan_guard", "test_ablations", "test_demo", "test_onednn",
    "test_label_sets", "test_bad_inputs", "test_bundle_anywhere", "test_lowering", "test_disk_errors",
)
# Integration tests: they train, compile whole networks or run jobs in subprocesses. Marked ``slow``, so that
# ``pytest -m "not slow"`` is the quick lane of unit tests (hand-computed values, small functions); CI runs both.
# (The other files mark their own slow tests.)
INTEGRATION = frozenset((
    "test_notebook", "test_multiprocess", "test_determinism", "test_cv", "test_cmft", "test_cmff_train", "test_split",
    "test_crash_resume", "test_cli", "test_predict", "test_sharding", "test_demo", "test_device_check",
    "test_bad_inputs", "test_bundle_anywhere", "test_lowering", "test_preemption", "test_nan_guard",
    "test_disk_errors",
))


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within a file is kept
    for item in items:
        if item.path.stem in INTEGRATION:
            item.add_marker(pytest.mark.slow)
