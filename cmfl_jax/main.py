"""Command-line entry point: ``python -m cmfl_jax.main --config=configs/<job>.py --workdir=DIR``.

It only parses flags and dispatches on ``config.job``. Bad input (a
:class:`~cmfl_jax.errors.CMFLError`) prints one line on stderr and exits with status 2;
``--verbose`` shows the traceback instead.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from typing import NoReturn

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
    """Persist XLA compilations (a 3D U-Net step takes ~1 min to compile on CPU) across runs and resumes:
    under the cache folder, unless JAX's own ``JAX_COMPILATION_CACHE_DIR`` names another (the tests share one)."""
    import jax

    from cmfl_jax.data.cache import default_cache_dir

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(default_cache_dir(), "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _write_config(config, workdir: str) -> None:
    """``<workdir>/config.json``: what this run was asked to do (CMFF checks its CMFT run's against its own)."""
    from cmfl_jax.data.io import atomic_path

    os.makedirs(workdir, exist_ok=True)
    with atomic_path(os.path.join(workdir, "config.json")) as tmp, open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _run(argv: list[str]) -> None:
    del argv
    config = _load_config()
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


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2. ``os._exit``, not ``sys.exit``: every file this run wrote is closed by
    now, and threads a failed Orbax/tensorstore read left winding down cannot print after the one line."""
    print(f"cmfl_jax: error: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


def _flag_problem(e: Exception, argv: list[str]) -> str:
    """One line for a flag that absl or ml_collections rejected (an unknown key, a value of the wrong type)."""
    text = str(e).strip()
    if isinstance(e, flags.UnrecognizedFlagError) and e.flagname.startswith("config."):
        given = next((a for a in argv if a.startswith(f"--{e.flagname}=") or a == f"--{e.flagname}"), "")
        return f"{e.flagname}: unknown config key (or a sub-key of a non-dict value){' in ' + given if given else ''}"
    if "Failed loading config file" in text:  # config_flags: the file is missing or does not import
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        at = next((i for i, line in enumerate(lines) if line.startswith("Attempted")), None)
        path = lines[at + 1] if at is not None and at + 1 < len(lines) else "--config"
        return f"{path}: cannot load config file ({lines[-1]})"
    if isinstance(e, (AttributeError, KeyError)):  # config_flags looking up a key that the config lacks
        key = next((a.split("=")[0][2:] for a in argv if a.startswith("--config.")), "config")
        return f"{key}: unknown config key ({text.strip(chr(34) + chr(39))!r} not found)"
    if "Error whilst parsing config file" in text:  # an exception from get_config (e.g. an unknown variant)
        last = [line for line in text.splitlines() if line.strip()][-1]
        return f"{text.split(':', 1)[0].removeprefix('flag ')}: {last.strip()}"
    return text.splitlines()[0].removeprefix("flag ")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but a bad flag or config override is one line on stderr and exit status 2 (no usage dump)."""
    try:
        return FLAGS(argv)
    except Exception as e:  # absl's flags.Error, and config_flags' AttributeError/KeyError for unknown keys
        if "--verbose" in argv:
            raise
        _fail(_flag_problem(e, argv))


def _load_config():
    """``FLAGS.config``, with a config file that failed to load reported as CMFLError (config_flags defers it)."""
    try:
        config = FLAGS.config
        config.get("job")  # a lazy proxy until first used
        return config
    except OSError as e:
        raise CMFLError(None, _flag_problem(e, [])) from e


def main(argv: list[str]) -> None:
    workdir = FLAGS.workdir
    fresh_workdir = not os.path.exists(workdir)
    fresh_config = not os.path.exists(os.path.join(workdir, "config.json"))
    try:
        _run(argv)
    except Exception as e:
        error = e if isinstance(e, CMFLError) else _disk_error(e, workdir)
        if error is None:
            raise
        _undo_config(workdir, fresh_workdir, fresh_config)
        if FLAGS.verbose:
            raise
        _fail(str(error))


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _disk_error(e: BaseException, workdir: str) -> CMFLError | None:
    """The out-of-space (or read-only, quota) OSError behind ``e`` as a one-line error, or None if there is none.

    Orbax's writer threads wrap it, and tensorstore (its array writer) reports it only as text.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            where, problem = e.filename or workdir, f"{e.strerror or e} (errno {errno.errorcode[e.errno]})"
            break
        if "No space left on device" in str(e):
            where, problem = workdir, f"{str(e).strip().splitlines()[0]} (errno ENOSPC)"
            break
        e = e.__cause__ or e.__context__
    else:
        return None
    return CMFLError(where, f"{problem}; every output is written atomically, so nothing half-written was kept: "
                            f"free space and run the same command again (training resumes from its last checkpoint)")


def _undo_config(workdir: str, fresh_workdir: bool, fresh_config: bool) -> None:
    """Bad input leaves nothing behind: the config.json this run wrote and, in a workdir it created, the folders
    it left empty. Files it did finish (a checkpoint saved before a later error) stay."""
    if fresh_config and os.path.exists(os.path.join(workdir, "config.json")):
        os.remove(os.path.join(workdir, "config.json"))
    if fresh_workdir and os.path.isdir(workdir):
        for path, _, _ in sorted(os.walk(workdir), key=lambda w: -len(w[0])):  # deepest first
            if not os.listdir(path):
                os.rmdir(path)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
