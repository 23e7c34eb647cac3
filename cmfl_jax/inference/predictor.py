"""A trained CMFF network ready to predict, loaded from a CMFF workdir or an exported bundle.

The model is rebuilt from the run's config (``config.json`` of the workdir, or the copy in
``bundle.json``) and only its params are restored (no optimizer state). Both sources give the same
:class:`Predictor`, so prediction, evaluation and export never care which one they got. A bundle can
also be run from its StableHLO alone, without this module or any model code:
:func:`cmfl_jax.inference.stablehlo.load_stablehlo_predictor` gives a predictor with the same interface.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from cmfl_jax import checkpoints
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.sliding_window import cmff_predict_fn, sliding_window
from cmfl_jax.inference.stablehlo import BUNDLE_FILE, BUNDLE_FORMAT, VolumePredictor, read_bundle_info
from cmfl_jax.label_sets import LABEL_SETS, LEGACY, LabelSet, run_label_set
from cmfl_jax.models import builder

__all__ = ["BUNDLE_FILE", "BUNDLE_FORMAT", "CHECKPOINT_DIRS", "Predictor", "is_bundle", "load_bundle",
           "load_predictor", "load_workdir"]

# config.checkpoint -> the CMFF workdir's sub-folder.
CHECKPOINT_DIRS = {"best": "best", "final": "final", "latest": "checkpoints"}


@dataclasses.dataclass
class Predictor(VolumePredictor):
    """A trained CMFFNet and what prediction needs to know about its training (``model_input`` and ``labels``
    come from :class:`~cmfl_jax.inference.stablehlo.VolumePredictor`)."""

    model: object
    params: dict
    pairing: str
    window: tuple[int, int, int]
    normalization: str
    source: str
    output: str = "classes"
    label_set: LabelSet = LABEL_SETS[LEGACY]

    @property
    def multiple(self) -> int:
        """What every window edge must divide by: the U-Net's 2^depth."""
        return 2 ** int(self.model.depth)

    def probabilities(self, image: np.ndarray, overlap: float = 0.5, batch_size: int = 1, mirror: bool = False,
                      window: tuple[int, ...] | None = None) -> np.ndarray:
        """Class (or region) probabilities ``(D, H, W, K)`` of a pre-processed ``(D, H, W, 4)`` volume."""
        fn = _predict_fn(self.model, self.pairing, mirror)
        return sliding_window(functools.partial(fn, self.params), image, window or self.window, overlap, batch_size)


@functools.lru_cache(maxsize=8)
def _predict_fn(model, pairing: str, mirror: bool):
    return cmff_predict_fn(model, pairing, mirror)  # one jitted function (one compilation) per model and setting


def _read_run_config(model_dir: str) -> ml_collections.ConfigDict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise CMFLError(model_dir, "model directory (config.model_dir) does not exist")
    if not os.path.isfile(path):
        raise CMFLError(path, "file not found: config.model_dir must be the workdir of a CMFF run (configs/cmff.py)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.get("job") != "cmff":
        raise CMFLError(path, f"this is a {config.get('job')!r} run, not a CMFF run (configs/cmff.py)")
    return config


def _predictor(config: ml_collections.ConfigDict, params: dict, window, source: str) -> Predictor:
    labels = run_label_set(config)
    model = builder.cmff_net(config.model, labels.num_classes)
    return Predictor(model, params, config.data.pairing, tuple(int(w) for w in window), config.data.normalization,
                     source, model.output, labels)


def load_workdir(model_dir: str, checkpoint: str = "best") -> Predictor:
    """The predictor of a CMFF workdir's ``best``, ``final`` or ``latest`` checkpoint (params only)."""
    if checkpoint not in CHECKPOINT_DIRS:
        raise CMFLError("config.checkpoint", f"unknown value {checkpoint!r}; "
                                             f"choose one of {', '.join(CHECKPOINT_DIRS)}")
    run_config = _read_run_config(model_dir)
    abstract = builder.abstract_params(builder.cmff_net(run_config.model, run_label_set(run_config).num_classes))
    subdir = CHECKPOINT_DIRS[checkpoint]
    step = checkpoints.latest_step(model_dir, subdir)
    if step is None:
        raise CMFLError(os.path.join(model_dir, subdir), f"no {checkpoint} checkpoint in this CMFF workdir")
    source = os.path.join(os.path.abspath(model_dir), subdir, str(step))
    params = checkpoints.restore_params(model_dir, subdir, step, {"seg": abstract})["seg"]
    if len(jax.tree.leaves(params)) != len(jax.tree.leaves(abstract)):
        raise CMFLError(source, "checkpoint does not match the model of its config.json (another architecture?)")
    m = run_config.model
    logging.info("predict: model from %s (%s, attention %s, base %d, depth %d)", source, m.branches, m.attention,
                 m.base, m.depth)
    return _predictor(run_config, params, run_config.data.patch_size, source)


def is_bundle(path: str) -> bool:
    return os.path.isfile(os.path.join(path, BUNDLE_FILE))


def load_bundle(path: str) -> Predictor:
    """The :class:`Predictor` of an exported bundle (``configs/export.py``): the Flax model and its params."""
    info = read_bundle_info(path)
    config = ml_collections.ConfigDict(info["config"])
    abstract = builder.abstract_params(builder.cmff_net(config.model, run_label_set(config).num_classes))
    try:
        params = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, "params")), abstract)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CMFLError(os.path.join(path, "params"), f"cannot restore params: {str(e).splitlines()[0]}") from e
    return _predictor(config, params, info["window"], os.path.abspath(path))


def load_predictor(model_dir: str, checkpoint: str = "best") -> Predictor:
    """A bundle's predictor, or else a CMFF workdir's ``checkpoint`` (both the Flax model with its params)."""
    return load_bundle(model_dir) if is_bundle(model_dir) else load_workdir(model_dir, checkpoint)
