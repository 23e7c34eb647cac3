"""The ``cmft`` job (``configs/cmft.py``): phase 1, the CycleGAN between the modality pairs A and B.

Reads patches of the training part of ``config.data.split`` only (CMFF's validation fold stays unseen), trains
the four networks of :mod:`cmfl_jax.training.cmft_step` with the resumable loop, and draws a preview of the
translations every ``train.preview_every`` steps.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from cmfl_jax import sharding
from cmfl_jax.data.dataset import cache_subjects, split_of
from cmfl_jax.data.device_augment import device_augmentation
from cmfl_jax.data.pairs import pair_channels, split_pairs
from cmfl_jax.errors import CMFLError
from cmfl_jax.previews import save_translation_png
from cmfl_jax.training.cmft_step import GENERATORS, create_states, make_train_step, translate
from cmfl_jax.training.loop import Phase, device_batch, fit, training_patches


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train CMFT on the configured data; returns the final states."""
    sharding.initialize_distributed(config)
    c = config.cmft
    if c.objective not in GENERATORS:
        raise CMFLError("config.cmft.objective", f"unknown objective {c.objective!r}; choose cycle or self")
    pair_channels(config.data.pairing)  # fail early on a bad pairing
    train_subjects, held_out = split_of(config.data)  # never CMFF's validation fold (the same data.split)
    logging.info("cmft: %d training subjects, %d held out for CMFF validation (data.split)", len(train_subjects),
                 len(held_out))
    entries = cache_subjects(config.data, train_subjects)
    dataset = training_patches(config, entries)
    states = create_states(jax.random.key(config.seed), config)
    preview = jax.jit(functools.partial(translate, objective=c.objective))

    def on_step(step, states, batch):
        a, b = split_pairs(batch["image"], config.data.pairing)
        outputs, a, b = jax.device_get((preview(states, a[:1], b[:1]), a[0], b[0]))
        path = os.path.join(workdir, "previews", f"cmft_{step:07d}.png")
        save_translation_png(path, np.asarray(a), np.asarray(b), {k: v[0] for k, v in outputs.items()},
                             title=f"CMFT step {step}")
        return None

    every = config.train.preview_every
    phase = Phase("cmft", states, make_train_step(config), to_batch=device_batch, on_step=on_step,
                  on_step_due=lambda step: bool(every) and step % every == 0, augment=device_augmentation(config))
    states, _ = fit(phase, dataset, config.train, workdir)
    return states


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    train(config, workdir)
