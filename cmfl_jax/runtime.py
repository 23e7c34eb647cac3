"""What the command line sets up before any job runs: logs on stdout, the compilation cache, config.json."""

from __future__ import annotations

import os
import sys

import ml_collections
from absl import logging


def _quiet_libraries(record) -> bool:
    """Keep library INFO chatter (Orbax logs every save in detail) out of the job's log; warnings pass."""
    return record.levelno >= 30 or not any(lib in record.pathname for lib in ("/orbax/", "/grain/", "/jax/"))


def log_to_stdout() -> None:
    """Logs and progress lines go to stdout, so stderr carries nothing but errors (one line each)."""
    handler = logging.get_absl_handler().python_handler
    handler.stream = sys.stdout
    handler.addFilter(_quiet_libraries)
    logging.set_verbosity(logging.INFO)


def enable_compilation_cache() -> None:
    """Persist XLA compilations (a 3D U-Net step takes long to compile on a CPU) across runs and resumes:
    under the cache folder, unless JAX's own ``JAX_COMPILATION_CACHE_DIR`` names another (the tests share one)."""
    import jax

    from cmfl_jax.data.cache import default_cache_dir

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(default_cache_dir(), "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """``<workdir>/config.json``: what this run was asked to do (CMFF checks its CMFT run's against its own)."""
    from cmfl_jax.data.io import atomic_path

    os.makedirs(workdir, exist_ok=True)
    with atomic_path(os.path.join(workdir, "config.json")) as tmp, open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
