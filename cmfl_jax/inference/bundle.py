"""Write a bundle: a trained CMFF model packed for evaluation and deployment (``configs/export.py``).

A bundle is a directory:

* ``bundle.json``: the CMFF run's config (it rebuilds the model), the internal class labels, the
  checkpoint it came from and that checkpoint's validation metrics;
* ``params/``: the params only (Orbax, no optimizer state);
* ``window_<D>x<H>x<W>.stablehlo``: the window-level function ``(1, D, H, W, 4) image -> (1, D, H, W, 4)
  class probabilities`` with the params inside, serialized with ``jax.export``; it runs with JAX alone,
  without this package's model code (``jax.export.deserialize(blob).call(x)``).

:func:`cmfl_jax.inference.predictor.load_bundle` reads it back as the same predictor a workdir gives.
The bundle is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from cmfl_jax.data.pairs import split_pairs
from cmfl_jax.inference.predictor import BUNDLE_FILE, BUNDLE_FORMAT, CHECKPOINT_DIRS, Predictor, load_workdir
from cmfl_jax.label_classes import CLASS_LABELS
from cmfl_jax.training import checkpoints


def stablehlo_name(window) -> str:
    return "window_" + "x".join(str(int(w)) for w in window) + ".stablehlo"


def export_window_function(predictor: Predictor, window=None) -> bytes:
    """``jax.export`` of the window-level probability function for a fixed window, params embedded."""
    window = tuple(window or predictor.window)

    def probs(x):
        a, b = split_pairs(x, predictor.pairing)
        return predictor.model.apply({"params": predictor.params}, a, b)["probs"]

    exported = jax.export.export(jax.jit(probs))(jax.ShapeDtypeStruct((1, *window, 4), jnp.float32))
    return bytes(exported.serialize())


def load_window_function(path: str):
    """The deserialized window function of a bundle: ``f(x)`` with ``x`` of its fixed ``(1, D, H, W, 4)`` shape."""
    with open(path, "rb") as f:
        return jax.export.deserialize(bytearray(f.read())).call


def export_bundle(model_dir: str, out_dir: str, checkpoint: str = "best") -> str:
    """Write the bundle of a CMFF workdir's checkpoint to ``out_dir`` (replacing it); returns ``out_dir``."""
    predictor = load_workdir(model_dir, checkpoint)
    with open(os.path.join(model_dir, "config.json")) as f:
        run_config = json.load(f)
    meta = checkpoints.latest_meta(model_dir, CHECKPOINT_DIRS[checkpoint]) or {}
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-bundle-", dir=parent)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, "params"), jax.device_get(predictor.params))
        checkpointer.wait_until_finished()  # saves are asynchronous: finish before the rename
        checkpointer.close()
        blob = export_window_function(predictor)
        with open(os.path.join(tmp, stablehlo_name(predictor.window)), "wb") as f:
            f.write(blob)
        info = {
            "format": BUNDLE_FORMAT,
            "config": run_config,
            "class_labels": list(CLASS_LABELS),
            "label_convention": "internal 0/1/2/4; predict writes each dataset's own (ET = 4, or 3 for BraTS 2023+)",
            "source": predictor.source,
            "step": meta.get("step"),
            "validation": meta.get("val", {}),
            "window": list(predictor.window),
        }
        with open(os.path.join(tmp, BUNDLE_FILE), "w") as f:
            json.dump(info, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    logging.info("export: bundle of %s written to %s", predictor.source, out_dir)
    return out_dir
