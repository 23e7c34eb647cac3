"""Run jobs as the stages of a bigger job (the demo, the CV runner): each in its own folder, reused when done.

A stage is a job of the registry (:data:`cmfl_jax.jobs.JOBS`) run with its own config on its own folder. After
it finishes, a marker (``demo_stage.json``, ``cv_stage.json``) records its config and the split it saw; running
the same command again reuses every stage whose marker matches and resumes an unfinished training from its
checkpoint. A stage after one that ran is redone (its inputs changed).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import time
from collections.abc import Sequence

import ml_collections
from absl import logging

from cmfl_jax import checkpoints, runtime
from cmfl_jax.config_defaults import model_config
from cmfl_jax.data.io import atomic_path, read_json
from cmfl_jax.jobs import job_module


def training_stages(config: ml_collections.ConfigDict, split_file: str, cmft_dir: str
                    ) -> dict[str, ml_collections.ConfigDict]:
    """CMFT's and CMFF's own configs in a combined job's config (``config.cmft``, ``config.cmff``) with its shared
    seed, data and U-Net: both read the ids of ``split_file``, so CMFT never sees CMFF's validation subjects;
    CMFF starts from the CMFT run in ``cmft_dir``."""
    out = {}
    for name in ("cmft", "cmff"):
        stage = copy.deepcopy(config[name])
        stage.unlock()
        stage.seed = config.seed
        stage.data = copy.deepcopy(config.data)
        stage.data.split.file = split_file
        out[name] = stage
    # CMFT's U-Net is the shared one; the CMFF variant keys (branches, attention) are CMFF's alone.
    out["cmft"].model = ml_collections.ConfigDict({k: config.model[k] for k in model_config()})
    out["cmff"].model = copy.deepcopy(config.model)
    out["cmff"].init.cmft_workdir = cmft_dir
    return out


def finished(name: str, stage: ml_collections.ConfigDict, stage_dir: str) -> bool:
    """False when a training stage stopped early (SIGTERM/SIGINT: it saved its step and returned)."""
    if name == "cmft":
        return (checkpoints.latest_step(stage_dir) or 0) >= stage.train.steps
    if name == "cmff":
        return (checkpoints.latest_step(stage_dir, "final") or 0) >= stage.train.steps
    return True


def run_stage(name: str, stage: ml_collections.ConfigDict, stage_dir: str) -> None:
    """The job's own ``run`` with its ``config.json`` (as the CLI writes it: CMFF and predict read it back);
    what the job prints goes to the log, so the calling job's summary is the one block on stdout."""
    module = job_module(name)
    runtime.write_config(stage, stage_dir)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        module.run(stage, stage_dir)
    for line in printed.getvalue().splitlines():
        logging.info("%s: %s", name, line)


def write_text(path: str, text: str) -> None:
    """``text`` and a newline into ``path``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text + "\n")


def run_stages(stages: dict[str, ml_collections.ConfigDict], workdir: str, split: str = "",
               names: Sequence[str] | None = None, marker: str = "demo_stage.json", who: str = "demo"
               ) -> dict[str, dict] | None:
    """Run (or reuse) the stages ``names`` (default: all of ``stages``) in order, each in ``<workdir>/<name>``;
    ``{stage: {"seconds", "reused"}}``, or None if a training was stopped before its last step.

    A stage is reused when its config and ``split`` (the split's ids, which its config names only by file) are
    those of its last finished run (its ``marker`` file); ``who`` prefixes the log lines.
    """
    report, upstream_ran = {}, False
    for name in names or list(stages):
        stage_dir = os.path.join(workdir, name)
        key = stages[name].to_json_best_effort(sort_keys=True)
        record = read_json(os.path.join(stage_dir, marker))
        if not upstream_ran and record is not None and record.get("config") == key and record.get("split") == split:
            logging.info("%s: %s finished before with this config, reused (%s)", who, name, stage_dir)
            report[name] = {"seconds": record.get("seconds", 0.0), "reused": True}
            continue
        logging.info("%s: stage %s -> %s", who, name, stage_dir)
        start = time.perf_counter()
        run_stage(name, stages[name], stage_dir)
        if not finished(name, stages[name], stage_dir):
            logging.info("%s: %s stopped before its last step; run the same command to resume", who, name)
            return None
        seconds = time.perf_counter() - start
        write_text(os.path.join(stage_dir, marker), json.dumps({"config": key, "split": split, "seconds": seconds}))
        report[name] = {"seconds": seconds, "reused": False}
        upstream_ran = True
    return report
