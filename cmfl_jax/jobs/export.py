"""The ``export`` job (``configs/export.py``): a CMFF workdir's checkpoint as a bundle
(:mod:`cmfl_jax.inference.bundle`), which ``configs/predict.py`` takes in place of the workdir. Its StableHLO
window function is exported for the platforms of ``config.platforms`` (default cpu, cuda, tpu)."""

from __future__ import annotations

import os

import ml_collections

from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.bundle import export_bundle


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if not config.model_dir:
        raise CMFLError("config.model_dir", "is empty: give the workdir of a CMFF run (configs/cmff.py)")
    out = export_bundle(config.model_dir, config.out_dir or os.path.join(workdir, "bundle"), config.checkpoint,
                        config.platforms)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"bundle: {out} ({size / 2**20:.1f} MiB)")
