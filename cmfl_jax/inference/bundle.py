"""Write a bundle: a trained CMFF model packed for evaluation and deployment (``configs/export.py``).

A bundle is a directory:

* ``bundle.json``: the CMFF run's config (it rebuilds the model), its ``output`` kind (``"classes"``: the
  channels are the internal class labels; ``"regions"``: WT, TC, ET sigmoids, see
  :mod:`cmfl_jax.label_classes`), the checkpoint it came from and that checkpoint's validation metrics;
* ``params/``: the params only (Orbax, no optimizer state);
* ``window_<D>x<H>x<W>.stablehlo``: the window-level function ``(b, D, H, W, 4) image -> (b, D, H, W, K)
  class or region probabilities`` with the params inside, serialized with ``jax.export`` for every platform of
  ``config.platforms`` (default ``cpu``, ``cuda``, ``tpu``: one file, the platform picked where it runs; with
  ``conv_impl="auto"`` it carries both conv paths, see :mod:`cmfl_jax.models.conv`) and a symbolic batch ``b``
  (the window is fixed). It runs with JAX alone, without this package's model code
  (``jax.export.deserialize(blob).call(x)``; :mod:`cmfl_jax.inference.stablehlo`).

``bundle.json`` (format :data:`~cmfl_jax.inference.stablehlo.BUNDLE_FORMAT` = 2) also names the StableHLO file,
its ``platforms`` and ``"batch": "symbolic"``. :func:`cmfl_jax.inference.predictor.load_bundle` reads a bundle back
as the same predictor a workdir gives; :func:`cmfl_jax.inference.stablehlo.load_stablehlo_predictor` as one that
runs the StableHLO. The bundle is built in a temporary folder and renamed into place.
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

from cmfl_jax import checkpoints
from cmfl_jax.data.pairs import split_pairs
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.predictor import CHECKPOINT_DIRS, Predictor, load_workdir
from cmfl_jax.inference.stablehlo import BUNDLE_FILE, BUNDLE_FORMAT, stablehlo_name
from cmfl_jax.label_classes import REGION_LABELS
from cmfl_jax.models.conv import pure_xla

__all__ = ["DEFAULT_PLATFORMS", "PLATFORMS", "export_bundle", "export_window_function",
           "parse_platforms", "stablehlo_name"]

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def parse_platforms(platforms: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"cpu,cuda,tpu"`` (or a sequence) -> ``("cpu", "cuda", "tpu")``, checked against :data:`PLATFORMS`."""
    names = [p.strip().lower() for p in (platforms.split(",") if isinstance(platforms, str) else platforms)]
    names = [p for p in names if p]
    bad = [p for p in names if p not in PLATFORMS]
    if bad or not names:
        raise CMFLError("config.platforms", f"{','.join(names) or 'empty'}: give a comma-separated list of "
                                            f"{', '.join(PLATFORMS)}")
    return tuple(dict.fromkeys(names))  # de-duplicated, in the order given


def export_window_function(predictor: Predictor, window=None, platforms=DEFAULT_PLATFORMS) -> bytes:
    """``jax.export`` of the window-level probability function for a fixed window and a symbolic batch, params
    embedded, lowered for every platform of ``platforms``."""
    window = tuple(window or predictor.window)

    def probs(x):
        a, b = split_pairs(x, predictor.pairing)
        return predictor.model.apply({"params": predictor.params}, a, b)["probs"]

    (batch,) = jax.export.symbolic_shape("b")
    with pure_xla():  # no oneDNN custom call: the bundle runs with JAX alone
        exported = jax.export.export(jax.jit(probs), platforms=tuple(platforms))(
            jax.ShapeDtypeStruct((batch, *window, 4), jnp.float32))
    return bytes(exported.serialize())


def export_bundle(model_dir: str, out_dir: str, checkpoint: str = "best", platforms=DEFAULT_PLATFORMS) -> str:
    """Write the bundle of a CMFF workdir's checkpoint to ``out_dir`` (replacing it); returns ``out_dir``.

    ``platforms``: what the StableHLO window function is exported for (names or a comma-separated string).
    """
    platforms = parse_platforms(platforms)
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
        blob = export_window_function(predictor, platforms=platforms)
        with open(os.path.join(tmp, stablehlo_name(predictor.window)), "wb") as f:
            f.write(blob)
        info = {
            "format": BUNDLE_FORMAT,
            "config": run_config,
            "output": predictor.output,  # what the probabilities' channels are (load_stablehlo_predictor reads it)
            "class_labels": list(predictor.label_set.classes),  # internal tissues (cmfl_jax.label_sets)
            "label_set": predictor.label_set.name,
            **({"region_labels": {r: list(v) for r, v in REGION_LABELS.items()}} if predictor.output == "regions"
               else {}),
            "label_convention": "internal tissues; predict writes each dataset's own label set's values",
            "source": predictor.source,
            "step": meta.get("step"),
            "validation": meta.get("val", {}),
            "postprocess": meta.get("postprocess") or {},  # the ET threshold tuned on the validation fold
            "window": list(predictor.window),
            "stablehlo": stablehlo_name(predictor.window),
            "platforms": list(platforms),
            "batch": "symbolic",
        }
        with open(os.path.join(tmp, BUNDLE_FILE), "w") as f:
            json.dump(info, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    logging.info("export: bundle of %s written to %s (StableHLO for %s)", predictor.source, out_dir,
                 ", ".join(platforms))
    return out_dir
