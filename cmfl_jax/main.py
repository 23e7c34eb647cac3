"""Command-line entry point: ``python -m cmfl_jax.main --config=configs/<job>.py --workdir=DIR``.

It only parses flags and dispatches on ``config.job``. Bad input (a
:class:`~cmfl_jax.errors.CMFLError`) prints one line on stderr and exits with status 2;
``--verbose`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cmfl_jax.errors import CMFLError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/cmft.py[:smoke].", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for this job's outputs (checkpoints, logs, predictions).")
flags.DEFINE_bool("verbose", False, "Show the full traceback on errors.")
flags.mark_flags_as_required(["config", "workdir"])

# config.job -> module with `run(config, workdir)`; imported lazily so each job loads only what it needs.
JOBS = {
    "prepare": "cmfl_jax.prepare",
    "cmft": "cmfl_jax.train_cmft",
    "cmff": "cmfl_jax.train_cmff",
    "predict": "cmfl_jax.predict",
    "export": "cmfl_jax.export",
    "evaluate": "cmfl_jax.evaluate",
    "demo": "cmfl_jax.demo",
}


def _quiet_libraries(record) -> bool:
    """Keep library INFO chatter (Orbax logs every save in detail) out of the job's log; warnings pass."""
    return record.levelno >= 30 or not any(lib in record.pathname for lib in ("/orbax/", "/grain/", "/jax/"))


def _enable_compilation_cache() -> None:
    """Persist XLA compilations (a 3D U-Net step takes ~1 min to compile on CPU) across runs and resumes."""
    import os

    import jax

    from cmfl_jax.data.cache import default_cache_dir

    jax.config.update("jax_compilation_cache_dir", os.path.join(default_cache_dir(), "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _write_config(config, workdir: str) -> None:
    """``<workdir>/config.json``: what this run was asked to do (CMFF checks its CMFT run's against its own)."""
    import os

    from cmfl_jax.data.io import atomic_path

    os.makedirs(workdir, exist_ok=True)
    with atomic_path(os.path.join(workdir, "config.json")) as tmp, open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _run(argv: list[str]) -> None:
    del argv
    config = FLAGS.config
    job = config.get("job")
    if job not in JOBS:
        raise CMFLError("config.job", f"unknown job {job!r}; known jobs: {', '.join(sorted(JOBS))}")
    # Logs and progress lines go to stdout, so stderr carries nothing but errors (one line each).
    handler = logging.get_absl_handler().python_handler
    handler.stream = sys.stdout
    handler.addFilter(_quiet_libraries)
    logging.set_verbosity(logging.INFO)
    _enable_compilation_cache()
    _write_config(config, FLAGS.workdir)
    importlib.import_module(JOBS[job]).run(config, FLAGS.workdir)


def main(argv: list[str]) -> None:
    try:
        _run(argv)
    except CMFLError as e:
        if FLAGS.verbose:
            raise
        print(f"cmfl_jax: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
