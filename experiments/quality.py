"""What each addition beyond the paper's recipe does on held-out subjects: one table per built-in data set.

Rows, each scored on the same held-out fold (the demo's split: 5 folds of the data set's 20 subjects, fold 0):

1. **the paper's recipe**: CMFT, then CMFF with the 4-class softmax, no post-processing;
2. **+ post-processing**: the same model; enhancing tumour below the threshold CMFF's validation tuned becomes
   NCR/NET (``config.postprocess``);
3. **+ regions**: CMFF from the same CMFT with WT/TC/ET sigmoid outputs (``model.output=regions``), post-processed;
4. **+ augmentation**: 3 with ``data.augment.preset=nnunet`` for CMFF's patches, post-processed;
5. **fold ensemble**: ``configs/cv.py`` with recipe 4 over the training subjects only (``--folds`` folds, each
   CMFT and CMFF without its fold), its models' mean probabilities, the threshold tuned on the pooled
   out-of-fold predictions.

Every run uses the demo's CPU budget (``configs/demo.py``: 96x96x64 subjects, 32^3 patches, U-Net base 8,
depth 3, CMFT 150 and CMFF 600 steps, CMFF Adam 1e-3 with Dice + CE, half the patch centres in the tumour).
Data sets: ``demo`` (the demo's: seed 0, 25 % LGG-like subjects) and ``lgg50`` (seed 1, half the subjects
LGG-like: more subjects without enhancing tumour, where a few false ET voxels cost ET Dice 0 and HD95 373).

Each run is a stage folder reused when finished (a stopped command resumes where it stopped):

    .venv/bin/python -m experiments.quality --datasets demo lgg50 [--workdir runs/quality] [--folds 3]
        [--out experiments/results/quality.md]
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cmfl_jax.config_variants import load_config, override  # noqa: E402

REGIONS = ("ET", "WT", "TC")
DATASETS = {"demo": {"seed": 0, "lgg_fraction": 0.25}, "lgg50": {"seed": 1, "lgg_fraction": 0.5}}
# row -> (label, CMFF overrides, post-processing: 0 off, -1 the tuned threshold)
ROWS = {
    "paper": ("the paper's recipe (4 classes, softmax)", {}, 0.0),
    "postprocess": ("+ post-processing", {}, -1.0),
    "regions": ("+ regions (WT/TC/ET sigmoids)", {"model.output": "regions"}, -1.0),
    "augment": ("+ augmentation (nnunet preset)", {"model.output": "regions", "data.augment.preset": "nnunet"}, -1.0),
}
MARKER = "quality_stage.json"


def log(message: str) -> None:
    print(f"[quality {datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def config_file(name: str, arg: str | None = None):
    return load_config(os.path.join(REPO, "configs", f"{name}.py:{arg or ''}"))


def dataset_config(name: str, smoke: bool = False):
    """The demo's default config (``:smoke`` with ``smoke``) on data set ``name``."""
    config = config_file("demo", "smoke" if smoke else None)
    config.data.synthetic.seed = DATASETS[name]["seed"]
    config.data.synthetic.lgg_fraction = DATASETS[name]["lgg_fraction"]
    return config


def train_models(name: str, base: str, folds: int, smoke: bool = False) -> tuple[dict[str, str], dict, list]:
    """Train (or reuse) every model of data set ``name`` under ``base``; (row -> model dir, paths, held-out)."""
    from cmfl_jax.jobs import demo
    from cmfl_jax.stage_runner import run_stage, run_stages

    config = dataset_config(name, smoke)
    _, held_out, paths = demo.write_split(config, base)
    split = open(paths["split"]).read()
    stages = demo.stage_configs(config, base, paths)
    models = {}
    for row, (label, overrides, _) in ROWS.items():
        folder = os.path.join(base, "paper" if row == "postprocess" else row)
        models[row] = os.path.join(folder, "cmff")
        if row == "postprocess":
            continue
        todo = {"cmft": stages["cmft"], "cmff": copy.deepcopy(stages["cmff"])} if row == "paper" else \
            {"cmff": copy.deepcopy(stages["cmff"])}
        todo["cmff"].init.cmft_workdir = os.path.join(base, "paper", "cmft")
        override(todo["cmff"], overrides)
        log(f"{name}: {label}")
        if run_stages(todo, folder, split, marker=MARKER, who=f"quality {name} {row}") is None:
            raise SystemExit(f"{folder}: stopped before its last step; run the same command to resume")
    cv = config_file("cv", "smoke" if smoke else None)
    cv.seed = config.seed
    cv.data.root = paths["train"]  # the training subjects only: the held-out fold stays unseen
    cv.data.split.folds = folds
    override(cv, ROWS["augment"][1])
    folder = os.path.join(base, "ensemble")
    if not os.path.isfile(os.path.join(folder, "cv_summary.json")):
        log(f"{name}: fold ensemble, {folds} folds of the training subjects")
        run_stage("cv", cv, folder)
    models["ensemble"] = folder
    return models, paths, held_out


def score(model_dir: str, postprocess: float, paths: dict, folder: str) -> list[dict]:
    """Predict the held-out subjects with ``model_dir`` and evaluate; the per-subject rows."""
    from cmfl_jax.stage_runner import run_stage

    predict = config_file("predict")
    predict.model_dir = model_dir
    predict.data.root = paths["validation"]
    predict.postprocess.et_min_mm3 = postprocess
    run_stage("predict", predict, os.path.join(folder, "predict"))
    evaluate = config_file("evaluate")
    evaluate.data.root = paths["validation"]
    evaluate.predictions = os.path.join(folder, "predict", "predictions")
    run_stage("evaluate", evaluate, os.path.join(folder, "evaluate"))
    with open(os.path.join(folder, "evaluate", "evaluation_per_subject.csv")) as f:
        return [{k: (v if k == "subject_id" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def without_et(held_out: list) -> set[str]:
    """Ids of the held-out subjects whose label map has no enhancing tumour."""
    from cmfl_jax.data.io import read_nifti

    return {s.subject_id for s in held_out if not np.any(read_nifti(s.label)[0] == s.et_label)}


def table(results: dict[str, list[dict]], no_et: set[str]) -> str:
    head = ("| recipe | Dice ET | Dice WT | Dice TC | HD95 ET | HD95 WT | HD95 TC | "
            f"subjects without ET scored Dice 0 (of {len(no_et)}) |")
    lines = [head, "|---|" + "---:|" * 7]
    for row, rows in results.items():
        label = ROWS[row][0] if row in ROWS else "fold ensemble (+ augmentation recipe)"
        dice = [np.mean([r[f"dice_{k}"] for r in rows]) for k in REGIONS]
        hd = [np.mean([r[f"hd95_{k}"] for r in rows]) for k in REGIONS]
        lost = sum(r["dice_ET"] == 0.0 for r in rows if r["subject_id"] in no_et)
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in dice) + " | " +
                     " | ".join(f"{v:.1f}" for v in hd) + f" | {lost} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--workdir", default=os.path.join("runs", "quality"))
    parser.add_argument("--folds", type=int, default=3, help="folds of the training subjects for the ensemble")
    parser.add_argument("--out", default=os.path.join("experiments", "results", "quality.md"))
    parser.add_argument("--smoke", action="store_true", help="the demo's :smoke sizes (seconds per run; a check)")
    args = parser.parse_args(argv)
    from experiments.ablations import _setup

    _setup()  # as cmfl_jax.main does for a job: INFO logs on stdout, the persistent compilation cache
    command = " ".join(["python -m experiments.quality", *(argv if argv is not None else sys.argv[1:])])
    sections, record = [], {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    for name in args.datasets:
        start = time.perf_counter()
        base = os.path.join(args.workdir, name)
        models, paths, held_out = train_models(name, base, args.folds, args.smoke)
        results = {row: score(models[row], ROWS[row][2] if row in ROWS else -1.0, paths,
                              os.path.join(base, "scores", row)) for row in models}
        no_et = without_et(held_out)
        text = table(results, no_et)
        minutes = (time.perf_counter() - start) / 60
        d = DATASETS[name]
        sections.append(f"## `{name}`: seed {d['seed']}, {d['lgg_fraction']:.0%} LGG-like subjects; "
                        f"{len(held_out)} held-out subjects ({len(no_et)} without ET)\n\n{text}\n\n"
                        f"({minutes:.0f} min for this data set in this invocation, finished runs reused)")
        record[name] = {"results": results, "without_et": sorted(no_et), "minutes": minutes}
        log(f"{name}:\n{text}")
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    header = (f"# Quality beyond the paper's recipe, on held-out subjects\n\nMeans over the held-out subjects "
              f"(BraTS rules: an empty prediction of an empty region scores Dice 1, HD95 0; one empty, Dice 0, "
              f"HD95 373.13). Command: `{command}` ({os.cpu_count()} CPUs, load average {load} at the end).\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(header + "\n" + "\n\n".join(sections) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
