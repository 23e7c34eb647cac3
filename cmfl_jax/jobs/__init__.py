"""The jobs a config can name (``config.job``), one module each with ``run(config, workdir)``.

The one registry of jobs: ``cmfl_jax.main`` dispatches on it and the demo and the CV job run their stages through
it (:mod:`cmfl_jax.stage_runner`), so no job imports another. Modules are named, not imported, so each job loads
only what it needs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

JOBS = {
    "prepare": "cmfl_jax.jobs.prepare",
    "split": "cmfl_jax.jobs.split",
    "cmft": "cmfl_jax.jobs.cmft",
    "cmff": "cmfl_jax.jobs.cmff",
    "predict": "cmfl_jax.jobs.predict",
    "evaluate": "cmfl_jax.jobs.evaluate",
    "export": "cmfl_jax.jobs.export",
    "demo": "cmfl_jax.jobs.demo",
    "cv": "cmfl_jax.jobs.cv",
}
# The method's flow, in order: what the demo chains (each stage with its own config file).
PIPELINE = ("cmft", "cmff", "predict", "evaluate", "export")


def job_module(name: str) -> ModuleType:
    """The module of job ``name`` (a key of :data:`JOBS`)."""
    return importlib.import_module(JOBS[name])
