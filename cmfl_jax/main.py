"""Command line: ``python -m cmfl_jax.main --config=configs/<job>.py[:variant] --workdir=DIR`` (or ``cmfl-jax ...``).

The method's flow, one job per step, each driven by its config file (``config.job`` picks the job):

    data root (BraTS folder or CSV; empty: built-in synthetic)   configs/prepare.py   (optional check + cache)
      train/validation split, shared by every phase             configs/split.py     (optional: split.json)
      -> CMFT: CycleGAN A <-> B, generators G_AB, G_BA          configs/cmft.py      -> <workdir>/checkpoints
      -> CMFF: S_A, S_B from G_AB, G_BA; fusion S_F             configs/cmff.py      (init.cmft_workdir=...)
      -> predict: whole volumes to NIfTI                        configs/predict.py   (model_dir=CMFF or bundle)
      -> evaluate: BraTS metrics against the labels             configs/evaluate.py  (predictions=...)
      -> export: a bundle (params + StableHLO)                  configs/export.py    (model_dir=CMFF workdir)
    configs/demo.py chains them all on one data root and prints one summary; configs/cv.py runs CMFT -> CMFF
    once per fold, scores each fold out of fold, and its workdir then predicts as a fold ensemble.

Any config value can be overridden (``--config.train.steps=200``). Bad input prints one line on stderr and
exits with status 2 (:mod:`cmfl_jax.cli_errors`); ``--verbose`` shows the traceback.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from cmfl_jax import cli_errors, runtime
from cmfl_jax.errors import CMFLError
from cmfl_jax.jobs import JOBS, job_module

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/cmft.py[:smoke].", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for this job's outputs (checkpoints, logs, predictions).")
flags.DEFINE_bool("verbose", False, "Show the full traceback on errors.")
flags.mark_flags_as_required(["config", "workdir"])


def _run() -> None:
    try:
        config = FLAGS.config
        job = config.get("job")  # config_flags loads the file lazily: a broken one fails here
    except OSError as e:
        raise cli_errors.config_file_error(e) from e
    if job not in JOBS:
        raise CMFLError("config.job", f"unknown job {job!r}; known jobs: {', '.join(sorted(JOBS))}")
    runtime.log_to_stdout()
    runtime.enable_compilation_cache()
    runtime.write_config(config, FLAGS.workdir)
    job_module(job).run(config, FLAGS.workdir)


def main(argv: list[str]) -> None:
    del argv
    cli_errors.run_reporting_errors(_run, FLAGS.workdir, FLAGS.verbose)


def cli() -> None:
    """The ``cmfl-jax`` console command (``pip install -e .``): the same as ``python -m cmfl_jax.main``."""
    app.run(main, flags_parser=cli_errors.parse_flags)


if __name__ == "__main__":
    cli()
