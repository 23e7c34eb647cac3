"""Export a trained CMFF model for evaluation and deployment (``configs/export.py``).

A bundle is a directory:

* ``bundle.json``: the CMFF run's config (it rebuilds the model), the internal class labels, the
  checkpoint it came from and that checkpoint's validation metrics;
* ``params/``: the params only (Orbax, no optimizer state);
* ``window_<D>x<H>x<W>.stablehlo``: the window-level function ``(1, D, H, W, 4) image -> (1, D, H, W, 4)
  class probabilities`` with the params inside, serialized with ``jax.export``; it runs with JAX alone,
  without this package's model code (``jax.export.deserialize(blob).call(x)``).

:func:`load_bundle` returns the same :class:`~cmfl_jax.predict.Predictor` as a CMFF workdir, so
``configs/predict.py`` takes either. The bundle is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from cmfl_jax import checkpoints
from cmfl_jax.classes import CLASS_LABELS
from cmfl_jax.data.pairs import split_pairs
from cmfl_jax.errors import CMFLError
from cmfl_jax.predict import CHECKPOINT_DIRS, Predictor, load_workdir

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = 1


def is_bundle(path: str) -> bool:
    return os.path.isfile(os.path.join(path, BUNDLE_FILE))


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
    manager = checkpoints.make_manager(model_dir, None, CHECKPOINT_DIRS[checkpoint], read_only=True)
    try:
        meta = checkpoints.read_meta(manager) or {}
    finally:
        manager.close()
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


def load_bundle(path: str) -> Predictor:
    """The :class:`~cmfl_jax.predict.Predictor` of an exported bundle."""
    from cmfl_jax.train_cmff import build_model

    if not is_bundle(path):
        raise CMFLError(path, f"not a bundle (no {BUNDLE_FILE}); export one with configs/export.py")
    with open(os.path.join(path, BUNDLE_FILE)) as f:
        info = json.load(f)
    if info.get("format") != BUNDLE_FORMAT:
        raise CMFLError(os.path.join(path, BUNDLE_FILE), f"bundle format {info.get('format')} is not {BUNDLE_FORMAT}")
    config = ml_collections.ConfigDict(info["config"])
    model = build_model(config)
    size = 2**model.depth
    x = jnp.zeros((1, size, size, size, 2), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x, x)["params"]
    try:
        params = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, "params")), abstract)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CMFLError(os.path.join(path, "params"), f"cannot restore params: {str(e).splitlines()[0]}") from e
    return Predictor(model, params, config.data.pairing, tuple(int(w) for w in info["window"]),
                     config.data.normalization, os.path.abspath(path))


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if not config.model_dir:
        raise CMFLError("config.model_dir", "is empty: give the workdir of a CMFF run (configs/cmff.py)")
    out = export_bundle(config.model_dir, config.out_dir or os.path.join(workdir, "bundle"), config.checkpoint)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"bundle: {out} ({size / 2**20:.1f} MiB)")
