"""The ``split`` job (``configs/split.py``): the train/validation split of a data root, written once.

``<workdir>/split.json`` and the CSVs ``train.csv`` and ``validation.csv`` (:func:`cmfl_jax.data.splits.write_split`);
``--config.data.split.file=<workdir>/split.json`` hands exactly these ids to CMFT, CMFF and the demo.
"""

from __future__ import annotations

import ml_collections

from cmfl_jax.data.dataset import resolve_root, split_of
from cmfl_jax.data.splits import split_settings, write_split


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    root = resolve_root(config.data)  # generates the built-in synthetic set on first use
    train, validation = split_of(config.data)
    settings = split_settings(config.data.split)
    paths = write_split(workdir, root, settings, train, validation)
    if config.data.split.file:
        held = f"the ids of {config.data.split.file}"
    else:
        held = (f"fold {settings['fold']} of {settings['folds']}, seed {settings['seed']}" if settings["folds"] > 1
                else "no validation fold")
    print(f"split of {root} ({held}): {len(train)} training and {len(validation)} validation subjects\n"
          f"  {paths['split']}\n  {paths['train']}\n  {paths['validation']}", flush=True)
    return paths
