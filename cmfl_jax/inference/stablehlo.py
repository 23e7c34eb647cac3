"""Predict from a bundle's StableHLO alone: the deserialized window function, no model code.

A bundle (:mod:`cmfl_jax.inference.bundle`) holds ``window_<D>x<H>x<W>.stablehlo``, the window-level
probability function ``(b, D, H, W, 4) -> (b, D, H, W, K)`` (4 classes, or 3 regions as ``bundle.json``'s
``output`` says) with the params inside, exported for the platforms
``bundle.json`` lists (``cpu``, ``cuda``, ``tpu`` by default) with a symbolic batch ``b``.
:func:`load_stablehlo_predictor` reads it with ``jax.export.deserialize`` and gives a :class:`StableHLOPredictor`,
which has the interface of :class:`cmfl_jax.inference.predictor.Predictor` (``model_input``, ``probabilities``,
``labels``) but never builds the Flax model: this module imports JAX, NumPy, JSON and the package's sliding
window, pre-processing and label helpers, none of which imports ``cmfl_jax.models`` (or Flax).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from cmfl_jax.data.preprocess import preprocess_images
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.sliding_window import mirrored, restrict_to_brain, sliding_window
from cmfl_jax.label_classes import check_output, probs_to_labels
from cmfl_jax.label_sets import LABEL_SETS, LEGACY, LabelSet, run_label_set

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = 2  # 2: the window function is exported for several platforms, with a symbolic batch


def stablehlo_name(window) -> str:
    """File name of a bundle's window function for ``window``."""
    return "window_" + "x".join(str(int(w)) for w in window) + ".stablehlo"


class VolumePredictor:
    """What every predictor shares: the model input of a subject, and labels from :meth:`probabilities`."""

    normalization: str
    output: str = "classes"  # config.model.output of the training run: classes or 3 regions
    label_set: LabelSet = LABEL_SETS[LEGACY]  # the run's label set: its classes, and what predict writes

    def probabilities(self, image: np.ndarray, overlap: float = 0.5, batch_size: int = 1, mirror: bool = False,
                      window: tuple[int, ...] | None = None) -> np.ndarray:
        raise NotImplementedError

    def model_input(self, loaded) -> np.ndarray:
        """The pre-processed ``(D, H, W, 4)`` volume of a :class:`~cmfl_jax.data.io.LoadedSubject`, normalised as
        in training."""
        return np.moveaxis(preprocess_images(loaded.images, self.normalization), 0, -1)

    def labels(self, image: np.ndarray, overlap: float = 0.5, batch_size: int = 1, mirror: bool = False,
               window: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(internal label map, class or region probabilities) of a pre-processed volume; ``window``
        replaces the training patch as the sliding window (``sliding_window.choose_window``)."""
        probs = self.probabilities(image, overlap, batch_size, mirror, window)
        return restrict_to_brain(probs_to_labels(probs, self.output, self.label_set.classes), image), probs


def read_bundle_info(path: str) -> dict:
    """``bundle.json`` of a bundle, checked to be of :data:`BUNDLE_FORMAT`."""
    file = os.path.join(path, BUNDLE_FILE)
    if not os.path.isfile(file):
        raise CMFLError(path, f"not a bundle (no {BUNDLE_FILE}); export one with configs/export.py")
    with open(file) as f:
        info = json.load(f)
    if info.get("format") != BUNDLE_FORMAT:
        raise CMFLError(file, f"bundle format {info.get('format')} is not supported (this version reads format "
                              f"{BUNDLE_FORMAT}); export the bundle again with configs/export.py")
    return info


def load_exported(file: str) -> jax.export.Exported:
    """The deserialized ``jax.export.Exported`` of a ``.stablehlo`` file."""
    if not os.path.isfile(file):
        raise CMFLError(file, "file not found: the bundle has no StableHLO window function")
    with open(file, "rb") as f:
        blob = bytearray(f.read())
    try:
        return jax.export.deserialize(blob)
    except Exception as e:  # a truncated or foreign file fails deep in the flatbuffer reader
        raise CMFLError(file, f"not a serialized jax.export function ({type(e).__name__})") from e


def _runs_here(platforms) -> bool:
    backend = jax.default_backend()
    return any(p in platforms for p in (("cuda", "rocm") if backend == "gpu" else (backend,)))


class StableHLOPredictor(VolumePredictor):
    """A bundle's exported window function as a predictor (same interface as the Flax one).

    Attributes:
      exported: the deserialized ``jax.export.Exported``.
      window: the fixed window edge per axis.
      normalization: the training run's ``config.data.normalization``.
      source: the bundle folder.
      output: the training run's ``config.model.output`` ("classes" or "regions").
      label_set: the training run's label set (:func:`cmfl_jax.label_sets.run_label_set`).
    """

    def __init__(self, exported: jax.export.Exported, window, normalization: str, source: str,
                 output: str = "classes", label_set: LabelSet = LABEL_SETS[LEGACY]):
        self.exported, self.window, self.label_set = exported, tuple(int(w) for w in window), label_set
        self.normalization, self.source, self.output = normalization, source, check_output(output)
        self._symbolic_batch = not isinstance(exported.in_avals[0].shape[0], int)
        # compiled once per batch shape; mirroring calls it once per flip
        plain = jax.jit(exported.call)
        self._fns = {False: plain, True: mirrored(plain)}

    def probabilities(self, image: np.ndarray, overlap: float = 0.5, batch_size: int = 1, mirror: bool = False,
                      window: tuple[int, ...] | None = None) -> np.ndarray:
        """Class probabilities ``(D, H, W, 4)`` of a pre-processed ``(D, H, W, 4)`` volume (``batch_size`` windows
        per call when the batch is symbolic, else the exported batch)."""
        if window is not None and tuple(window) != self.window:
            raise CMFLError(self.source, f"the StableHLO function takes windows of {self.window}, not {tuple(window)}")
        batch = batch_size if self._symbolic_batch else int(self.exported.in_avals[0].shape[0])
        return sliding_window(self._fns[bool(mirror)], image, self.window, overlap, batch)


def load_stablehlo_predictor(path: str) -> StableHLOPredictor:
    """The :class:`StableHLOPredictor` of a bundle folder (format :data:`BUNDLE_FORMAT`)."""
    info = read_bundle_info(path)
    window = tuple(int(w) for w in info["window"])
    file = os.path.join(path, info.get("stablehlo", stablehlo_name(window)))
    exported = load_exported(file)
    if not _runs_here(exported.platforms):
        raise CMFLError(file, f"exported for {', '.join(exported.platforms)}, not for this machine's "
                              f"{jax.default_backend()}; export again with --config.platforms (configs/export.py)")
    normalization = info["config"]["data"]["normalization"]
    return StableHLOPredictor(exported, window, normalization, os.path.abspath(path), bundle_output(info),
                              run_label_set(info["config"]))


def bundle_output(info: dict) -> str:
    """The output kind a bundle records (``"output"``); a bundle from before it has the paper's 4 classes."""
    return check_output(info.get("output", "classes"))
