"""How the command line reports bad input: one line on stderr, exit status 2, nothing half-written left.

Every :class:`~cmfl_jax.errors.CMFLError` (and a full disk, which Orbax and tensorstore report in their
own ways) becomes ``cmfl_jax: error: <file or key>: <problem>``; ``--verbose`` shows the traceback instead.
absl and ml_collections report a bad flag or config override as text, which is read here.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from absl import flags

from cmfl_jax.errors import CMFLError


def fail(message: str) -> NoReturn:
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
        return flags.FLAGS(argv)
    except Exception as e:  # absl's flags.Error, and config_flags' AttributeError/KeyError for unknown keys
        if "--verbose" in argv:
            raise
        fail(_flag_problem(e, argv))


def config_file_error(e: OSError) -> CMFLError:
    """A config file that failed to load (config_flags defers the error to its first use)."""
    return CMFLError(None, _flag_problem(e, []))


def run_reporting_errors(job: Callable[[], None], workdir: str, verbose: bool) -> None:
    """Run ``job``; bad input or a full disk ends the process with one line, after undoing the run's
    ``config.json`` and the empty folders of a workdir it created."""
    fresh_workdir = not os.path.exists(workdir)
    fresh_config = not os.path.exists(os.path.join(workdir, "config.json"))
    try:
        job()
    except Exception as e:
        error = e if isinstance(e, CMFLError) else _disk_error(e, workdir)
        if error is None:
            raise
        _undo_config(workdir, fresh_workdir, fresh_config)
        if verbose:
            raise
        fail(str(error))


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
