"""The whole method in one job (``configs/demo.py``): CMFT -> CMFF -> predict -> evaluate -> export.

Each stage is the existing job's ``run(config, workdir)`` on its own sub-folder of the workdir, with the
config of its own file (``configs/<job>.py``) plus the shared data, U-Net and seed. The split comes first
(``config.data.split``, written as the ``split`` job writes it: ``<workdir>/split.json``, ``train.csv``,
``validation.csv``); CMFT and CMFF get ``data.split.file=<workdir>/split.json``, so CMFT trains on the
training subjects only and CMFF validates on the rest, and predictions and evaluation cover only those
held-out subjects (``validation.csv`` as their data root), so the scores are on unseen subjects. Running
the same command again reuses every finished stage whose config and split are unchanged (a
``demo_stage.json`` marker in its folder) and resumes an unfinished training from its checkpoint; a stage
after one that ran is redone. The job ends with one summary on stdout, also written to
``<workdir>/summary.md``.
"""

from __future__ import annotations

import copy
import json
import os
import time

import ml_collections
from absl import logging

from cmfl_jax import checkpoints
from cmfl_jax.data import splits
from cmfl_jax.data.dataset import resolve_root, split_of
from cmfl_jax.data.io import atomic_path
from cmfl_jax.data.subject import Subject
from cmfl_jax.errors import CMFLError
from cmfl_jax.jobs import PIPELINE
from cmfl_jax.run_log import format_seconds
from cmfl_jax.stage_runner import run_stages, training_stages

STAGES = PIPELINE  # each stage is the job of that name, run through the registry
MARKER = "demo_stage.json"  # in each stage's folder: the config and split of its last finished run


def write_split(config: ml_collections.ConfigDict, workdir: str
                ) -> tuple[list[Subject], list[Subject], dict[str, str]]:
    """The split of ``config.data.split`` (or its file) written as the ``split`` job writes it, into ``workdir``.

    Returns (training subjects, held-out subjects, the paths of ``split.json``, ``train.csv``, ``validation.csv``
    under the keys ``split``, ``train``, ``validation``).
    """
    root = resolve_root(config.data)  # generates the synthetic data set on first use
    train, held_out = split_of(config.data)
    if not held_out:
        raise CMFLError("config.data.split.folds", "must be at least 2: the demo predicts and scores the held-out "
                                                   "fold")
    paths = splits.write_split(workdir, root, splits.split_settings(config.data.split), train, held_out)
    return train, held_out, paths


def stage_configs(config: ml_collections.ConfigDict, workdir: str, paths: dict[str, str]
                  ) -> dict[str, ml_collections.ConfigDict]:
    """Each stage's own config with the shared values and the paths between stages filled in.

    CMFT and CMFF read the data root with ``data.split.file`` = the written ``split.json`` (``paths["split"]``):
    CMFT trains on the training subjects only, CMFF trains on them and validates on the held-out ones; predict
    and evaluate read only the held-out subjects (``paths["validation"]`` as their data root).
    """
    dirs = {name: os.path.join(workdir, name) for name in STAGES}
    out = training_stages(config, paths["split"], dirs["cmft"])
    for name in (n for n in STAGES if n not in out):
        stage = copy.deepcopy(config[name])
        stage.unlock()
        out[name] = stage
    for name in ("predict", "evaluate"):
        out[name].data = copy.deepcopy(config.data)
        out[name].data.root = paths["validation"]
    out["predict"].data.require_labels = False
    out["predict"].model_dir = dirs["cmff"]
    out["evaluate"].predictions = os.path.join(dirs["predict"], "predictions")
    out["export"].model_dir = dirs["cmff"]
    return out


def summary_text(config: ml_collections.ConfigDict, workdir: str, stages: dict[str, ml_collections.ConfigDict],
                 report: dict[str, dict], n_train: int, held_out: list[Subject], wall: float) -> str:
    """The demo's one summary (Markdown): where every output is, how long each stage took, the metrics table."""
    d = {name: os.path.join(workdir, name) for name in STAGES}
    best = checkpoints.latest_meta(d["cmff"], "best")
    with open(os.path.join(d["evaluate"], "evaluation_summary.md")) as f:
        table = f.read().strip()
    root = config.data.root or resolve_root(config.data)
    shape = "x".join(str(s) for s in config.data.synthetic.shape)
    data = root if config.data.root else f"built-in synthetic, {config.data.synthetic.n} subjects at {shape}: {root}"
    m, c, f = config.model, stages["cmff"], stages["cmft"]
    took = ", ".join(f"{name} {format_seconds(r['seconds'])}{' (reused)' if r['reused'] else ''}"
                     for name, r in report.items())
    best_line = (f"best step {best['step']}, validation mean Dice {best['val']['dice_mean']:.4f} over "
                 f"{best['val'].get('subjects', len(held_out))} subjects" if best else "no best checkpoint")
    s = splits.split_settings(config.data.split)
    held = (f"the validation ids of `{config.data.split.file}`" if config.data.split.file
            else f"CMFF validation fold {s['fold']} of {s['folds']}")
    lines = [
        "# cmfl_jax demo",
        "",
        f"- data: {data}",
        f"- held out ({held}): {len(held_out)} subjects "
        f"({', '.join(h.subject_id for h in held_out)}), listed in `{os.path.join(workdir, splits.VALIDATION_CSV)}`; "
        f"the other {n_train} train both phases (`{os.path.join(workdir, splits.TRAIN_CSV)}`); the split: "
        f"`{os.path.join(workdir, splits.SPLIT_FILE)}`",
        f"- model: U-Net base {m.base}, depth {m.depth}, patches {'x'.join(map(str, config.data.patch_size))}, "
        f"CMFF branches {m.branches}, attention {m.attention}",
        f"- CMFT ({f.train.steps} steps): `{d['cmft']}` (checkpoints/, previews/, metrics.jsonl)",
        f"- CMFF ({c.train.steps} steps, init {c.init.mode}): `{d['cmff']}` (best/, final/, previews/; {best_line})",
        f"- predictions: `{os.path.join(d['predict'], 'predictions')}` ({len(held_out)} NIfTI; CMFF "
        f"`{stages['predict'].checkpoint}/`, ET under {stages['predict'].postprocess.et_min_mm3:g} mm³ to NCR/NET)",
        f"- evaluation: `{d['evaluate']}` (evaluation_summary.md/.csv, evaluation_per_subject.csv, "
        "evaluation_boxplot.png)",
        f"- export bundle: `{os.path.join(d['export'], 'bundle')}`",
        f"- time: {format_seconds(wall)} this run ({took})",
        "",
        f"Held-out subjects ({len(held_out)}), BraTS metrics in the paper's layout (HD95 in mm of the label's "
        "voxel spacing):",
        "",
        table,
    ]
    return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    start = time.perf_counter()
    train, held_out, paths = write_split(config, workdir)
    logging.info("demo: %d training and %d held-out subjects (%s)", len(train), len(held_out), paths["split"])
    stages = stage_configs(config, workdir, paths)
    split = json.dumps({"train": sorted(s.subject_id for s in train),
                        "validation": sorted(s.subject_id for s in held_out)}, sort_keys=True)  # as split.json lists
    report = run_stages(stages, workdir, split, STAGES, MARKER, "demo")
    if report is None:
        return
    text = summary_text(config, workdir, stages, report, len(train), held_out, time.perf_counter() - start)
    with atomic_path(os.path.join(workdir, "summary.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    print(text, end="", flush=True)
