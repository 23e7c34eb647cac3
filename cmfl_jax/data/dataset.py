"""From a data config to cached subjects: the one path every job takes to its data."""

from __future__ import annotations

import os
from collections.abc import Callable

import ml_collections

from cmfl_jax.data.cache import (
    CachedSubject,
    build_cache,
    cache_subject,
    default_cache_dir,
    preprocessed_dir,
)
from cmfl_jax.data.cache_size import estimate_line
from cmfl_jax.data.cached_subject import storage_for
from cmfl_jax.data.layouts import discover
from cmfl_jax.data.splits import apply_split
from cmfl_jax.data.subject import Subject
from cmfl_jax.synthetic import LGG_FRACTION, write_dataset


def synthetic_root(data: ml_collections.ConfigDict) -> str:
    """Folder of the built-in synthetic data set for this config, generated on first use."""
    syn = data.synthetic
    shape = tuple(int(s) for s in syn.shape)
    lgg_fraction = float(syn.get("lgg_fraction", LGG_FRACTION))
    name = f"{syn.layout}-n{syn.n}-{'x'.join(map(str, shape))}-seed{syn.seed}"
    name += f"-lgg{lgg_fraction:g}" if lgg_fraction != LGG_FRACTION else ""  # the default keeps its old name
    folder = os.path.join(data.cache_dir or default_cache_dir(), "synthetic", name)
    marker = os.path.join(folder, ".complete")
    if not os.path.exists(marker):
        write_dataset(folder, int(syn.n), layout=syn.layout, shape=shape, seed=int(syn.seed),
                      lgg_fraction=lgg_fraction)
        with open(marker, "w") as f:
            f.write("written by cmfl_jax.synthetic.write_dataset\n")
    return folder


def resolve_root(data: ml_collections.ConfigDict) -> str:
    """``data.root``, or the built-in synthetic data set when it is empty."""
    return data.root if data.root else synthetic_root(data)


def load_entries(data: ml_collections.ConfigDict, announce: Callable[[str], None] | None = None
                 ) -> list[CachedSubject]:
    """Discover, validate and cache every subject of the configured root (cached entries are reused).

    Entries of every root share one folder (``preprocessed_dir``), keyed by their source files. With
    ``announce``, the first subject is cached first and ``announce`` gets one line estimating the whole
    cache's size from it, before the others are built.
    """
    root = resolve_root(data)
    subjects = discover(root, require_labels=data.require_labels, label_set=data.get("label_set", "auto"))
    folder, storage = preprocessed_dir(data.cache_dir or None), cache_storage(data)
    if announce is not None and subjects:
        announce(estimate_line(cache_subject(subjects[0], folder, data.normalization, storage), len(subjects),
                               folder))
    return build_cache(subjects, folder, data.normalization, storage=storage)


def split_of(data: ml_collections.ConfigDict) -> tuple[list[Subject], list[Subject]]:
    """(train, validation) subjects of the configured root under ``data.split`` (not yet read or cached)."""
    root = resolve_root(data)
    subjects = discover(root, require_labels=data.require_labels, label_set=data.get("label_set", "auto"))
    return apply_split(subjects, data.split, root)


def cache_subjects(data: ml_collections.ConfigDict, subjects: list[Subject]) -> list[CachedSubject]:
    """Validate and cache ``subjects`` of the configured root (cached entries are reused)."""
    return build_cache(subjects, preprocessed_dir(data.cache_dir or None), data.normalization,
                       storage=cache_storage(data))


def cache_storage(data: ml_collections.ConfigDict) -> str:
    """The storage of ``data.cache_storage`` ("auto" when the config has none)."""
    return storage_for(data.get("cache_storage", "auto"), data.normalization)
