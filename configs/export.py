"""Export a CMFF run for evaluation: params only, the model config, metrics, and a StableHLO window function.

  python -m cmfl_jax.main --config=configs/export.py --workdir=runs/export --config.model_dir=runs/cmff
Writes ``<workdir>/bundle`` (or ``config.out_dir``); ``configs/predict.py`` takes it as ``config.model_dir``
(``--config.use_stablehlo=true`` runs the StableHLO without model code). The StableHLO is exported for every
platform of ``config.platforms`` (one file; the platform is picked where it runs) with a symbolic batch.
"""

import ml_collections

from cmfl_jax.config_variants import apply_variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.job = "export"
    config.model_dir = ""  # workdir of a CMFF run (configs/cmff.py)
    config.checkpoint = "best"  # "best" | "final" | "latest"
    config.out_dir = ""  # "" -> <workdir>/bundle
    config.platforms = "cpu,cuda,tpu"  # comma-separated: cpu, cuda, rocm, tpu (lowered here, no such device needed)
    return apply_variants(config, arg, {}, "export")
