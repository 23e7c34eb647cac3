"""The ``cmff`` job (``configs/cmff.py``): phase 2, segmentation by S_A, S_B and the fusion branch S_F.

S_A and S_B start from the CMFT generators (:mod:`cmfl_jax.training.cmft_init`), the network trains with
the step of :mod:`cmfl_jax.training.cmff_step`, and the held-out fold of ``config.data.split`` is validated as
configured (:mod:`cmfl_jax.training.validation`: a fixed subset periodically, the whole fold at the last step),
keeping the best model in ``best/`` and the last in ``final/`` with the whole fold's metrics. The head's classes
follow the subjects' label set (:mod:`cmfl_jax.label_sets`), recorded as ``config.model.label_set`` in
``config.json`` so that prediction and export rebuild the same head.
"""

from __future__ import annotations

import functools
import os
import shutil

import jax
import ml_collections
from absl import logging

from cmfl_jax import checkpoints, runtime, sharding
from cmfl_jax.data.dataset import cache_subjects, split_of
from cmfl_jax.data.device_augment import device_augmentation
from cmfl_jax.data.pairs import pair_channels
from cmfl_jax.data.splits import split_settings
from cmfl_jax.label_classes import check_output, check_output_classes
from cmfl_jax.label_sets import label_set_of_subjects
from cmfl_jax.training.cmff_step import create_states, make_train_step
from cmfl_jax.training.cmft_init import INIT_SOURCES, check_init_mode, cmft_checkpoint
from cmfl_jax.training.loop import Phase, device_batch, fit, training_patches
from cmfl_jax.training.validation import Validator


def _data(config: ml_collections.ConfigDict) -> tuple[list, list]:
    """(train, validation) entries of ``config.data.split``: the same split as CMFT's."""
    train, val = split_of(config.data)
    s = split_settings(config.data.split)
    logging.info("cmff: %d training and %d validation subjects (data.split: %s)", len(train), len(val),
                 config.data.split.file or f"fold {s['fold']} of {s['folds']}, seed {s['seed']}")
    entries = cache_subjects(config.data, train + val)
    return entries[: len(train)], entries[len(train):]


def record_label_set(config: ml_collections.ConfigDict, entries: list, workdir: str) -> None:
    """``config.model.label_set``: the one label set of the entries (their classes must agree), written into the
    workdir's ``config.json`` when there is one (the CLI's), so the model is rebuilt with the same head."""
    chosen = label_set_of_subjects([e.meta.get("label_set", "brats2021") for e in entries],
                                   config.model.get("label_set", ""))
    check_output_classes(config.model.get("output", "classes"), chosen.classes, chosen.name)
    if config.model.get("label_set", "") != chosen.name:
        config.model.label_set = chosen.name
        if os.path.isfile(os.path.join(workdir, "config.json")) and sharding.is_primary():
            runtime.write_config(config, workdir)
    logging.info("cmff: label set %s: %d classes", chosen.name, chosen.num_classes)


def save_final(workdir: str, states: dict, step: int, val: dict | None, postprocess: dict | None = None) -> None:
    """``<workdir>/final``: the states at the last step and their validation metrics (a finished run)."""
    manager = checkpoints.make_manager(workdir, 1, subdir="final")
    try:
        if manager.latest_step() != step:
            checkpoints.save(manager, step, states, {"step": step, "val": val or {}, "postprocess": postprocess or {}},
                             force=True)
    finally:
        checkpoints.close(manager)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train CMFF on the configured data, validating as configured; returns the final states."""
    sharding.initialize_distributed(config)
    pair_channels(config.data.pairing)  # fail early on a bad pairing
    check_init_mode(config)
    check_output(config.model.get("output", "classes"))  # fail early on a bad output kind
    if config.train.fresh and sharding.is_primary():
        for sub in ("best", "final"):  # fit() removes checkpoints/; a fresh run keeps no best or final either
            shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
    sharding.barrier("cmff_fresh")  # no process reads best/ or final/ before they are gone
    resuming = not config.train.fresh and checkpoints.latest_step(workdir) is not None
    if INIT_SOURCES[config.init.mode] and not resuming:
        cmft_checkpoint(config)  # before the data: a missing CMFT run is reported at once
    train_entries, val_entries = _data(config)
    record_label_set(config, train_entries + val_entries, workdir)
    dataset = training_patches(config, train_entries)
    states = create_states(jax.random.key(config.seed), config, resuming=resuming)
    validator = Validator(config, val_entries, workdir)

    def on_step(step, states, batch):
        del batch
        return validator(step, states)

    phase = Phase("cmff", states, make_train_step(config),
                  to_batch=functools.partial(device_batch, keys=("image", "label")), on_step=on_step,
                  on_step_due=validator.due, augment=device_augmentation(config))
    try:
        states, step = fit(phase, dataset, config.train, workdir)
    finally:
        validator.close()
    if step >= config.train.steps:  # not after a SIGTERM/SIGINT stop
        save_final(workdir, states, step, validator.scores, validator.postprocess)
    return states


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    train(config, workdir)
