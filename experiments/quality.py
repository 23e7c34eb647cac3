"""Recipes compared out of fold on any data root: k-fold cross-validation of each arm, one table per case.

    python -m experiments.quality --data ../shared/data/brats18_train --folds 4 --arms paper chosen torch
        [--workdir runs/real] [--out experiments/results/real_cv.md] [--overlays docs/images/real]

Each JAX arm is one ``configs/cv.py`` run (:mod:`cmfl_jax.jobs.cv`): for every fold, CMFT and CMFF train without
its held-out subjects, and the checkpoint and the ET threshold are chosen on an inner split of the training
subjects, so no scored subject reaches a choice. Every arm has the same budget in steps (:data:`BUDGET`). The
``torch`` arm (``experiments/torch_train.py``: the U-Net twin, MONAI's window and Dice + CE) trains on the same
folds' training subjects for the wall-clock seconds the ``paper`` arm's CMFT + CMFF took on that fold, and is scored by
``configs/evaluate.py``. Finished folds are reused, so a stopped command resumes. The recipe to make the default is
the arm with the best out-of-fold mean Dice.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import time

import numpy as np

from cmfl_jax.config_variants import load_config, override

REGIONS = ("ET", "WT", "TC")
# The per-fold budget of every JAX arm: CMFT and CMFF steps at the :cpu sizes (64^3 patches, U-Net base 8, depth 3).
BUDGET = {"cmft.train.steps": 50, "cmff.train.steps": 200, "cmff.val.every": 100}
COMMON = {"data.patch_size": (64, 64, 64), "cmft.train.save_every": 25, "cmft.train.preview_every": 0,
          "cmff.train.save_every": 100, "cmff.train.preview_every": 0}
ARMS = {  # name -> (label, overrides of configs/cv.py beyond COMMON and BUDGET)
    "paper": ("the paper's recipe (:cpu sizes; 4-class softmax, tumour patches, no post-processing)",
              {"data.tumour_prob": 1.0, "oof.et_min_mm3": 0.0}),
    "chosen": ("chosen: half the patch centres anywhere in the brain, clipped z-score, the ET threshold tuned on "
               "the inner split, tumour components < 100 mm³ removed",
               {"data.tumour_prob": 0.5, "data.normalization": "zscore_clip", "oof.et_min_mm3": -1.0,
                "oof.wt_min_mm3": 100.0}),
}
TORCH = ("torch", "PyTorch/MONAI U-Net twin (Dice + CE, MONAI window), the paper arm's seconds per fold")
REFERENCE = "paper"  # the arm whose folds (splits, seconds) the torch arm copies


def log(message: str) -> None:
    print(f"[quality {datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def cv_config(data: str, folds: int, overrides: dict):
    config = load_config("configs/cv.py")
    override(config, {"data.root": os.path.abspath(data), "data.split.folds": folds, **COMMON, **BUDGET, **overrides})
    return config


def run_arm(name: str, data: str, folds: int, workdir: str) -> list[dict]:
    """The arm's out-of-fold rows (one per subject, post-processed as the arm says), running what is missing."""
    from cmfl_jax.stage_runner import run_stage

    folder = os.path.join(workdir, name)
    if not os.path.isfile(os.path.join(folder, "cv_summary.json")):
        log(f"{name}: {folds}-fold cross-validation -> {folder}")
        run_stage("cv", cv_config(data, folds, ARMS[name][1]), folder)
    rows = []
    for k in range(folds):
        record = json.load(open(os.path.join(folder, f"fold{k}", "validation.json")))
        for s in record["subjects"]:
            post = s["postprocessed"]
            rows.append({"subject_id": s["subject_id"], "fold": k, **_flat(post),
                         "true_et_removed": s["true_et_removed"], "seconds": _training_seconds(folder, k)})
    return rows


def _flat(scores: dict) -> dict:
    out = {f"{m}_{r}": scores[r][m] for r in REGIONS for m in ("dice", "hd95")}
    out.update({f"ranked_{m}_{r}": scores["ranked"][r][f"lesionwise_{m}"] for r in REGIONS for m in ("dice", "hd95")})
    return out


def _training_seconds(arm_folder: str, k: int) -> float:
    """CMFT + CMFF wall time of fold k (their stage markers), compilation and CMFF's validations included."""
    return sum(json.load(open(os.path.join(arm_folder, f"fold{k}", stage, "cv_stage.json")))["seconds"]
               for stage in ("cmft", "cmff"))


def run_torch(data: str, folds: int, workdir: str) -> list[dict]:
    """The torch twin on the reference arm's folds and seconds, scored by the evaluate job."""
    from cmfl_jax.stage_runner import run_stage
    from experiments import torch_train

    rows, reference = [], os.path.join(workdir, REFERENCE)
    for k in range(folds):
        fold = os.path.join(reference, f"fold{k}")
        seconds = _training_seconds(reference, k)
        out = os.path.join(workdir, "torch", f"fold{k}")
        reference_config = cv_config(data, folds, ARMS[REFERENCE][1])
        config = reference_config.cmff
        config.data, config.model, config.seed = reference_config.data, reference_config.model, reference_config.seed
        log(f"torch fold {k}: {seconds:.0f} s of training -> {out}")
        torch_train.run(config, os.path.join(fold, "split.json"), out, seconds=seconds)
        evaluate = load_config("configs/evaluate.py")
        evaluate.data.root = os.path.join(fold, "validation.csv")
        evaluate.predictions = os.path.join(out, "predictions")
        if not os.path.isfile(os.path.join(out, "evaluate", "evaluation_per_subject.csv")):
            run_stage("evaluate", evaluate, os.path.join(out, "evaluate"))
        with open(os.path.join(out, "evaluate", "evaluation_per_subject.csv")) as f:
            for r in csv.DictReader(f):
                rows.append({"subject_id": r["subject_id"], "fold": k, "seconds": seconds, "true_et_removed": False,
                             **{c: float(r[c]) for c in r if c.startswith(("dice_", "hd95_", "ranked_"))}})
    return rows


def tables(results: dict[str, list[dict]], labels: dict[str, str]) -> str:
    """Means per arm (legacy and lesion-wise), then Dice and HD95 per case and arm."""
    arms = list(results)
    head = "| arm | " + " | ".join(f"Dice {r}" for r in REGIONS) + " | mean Dice | " + \
        " | ".join(f"HD95 {r}" for r in REGIONS) + " | " + " | ".join(f"lesion-wise Dice {r}" for r in REGIONS) + \
        " | lesion-wise HD95 (mean) | training s/fold | true ETs erased |"
    lines = [head, "|---|" + "---:|" * 12]
    for arm in arms:
        rows = results[arm]
        mean = {c: np.mean([r[c] for r in rows]) for c in rows[0] if c.startswith(("dice_", "hd95_", "ranked_"))}
        seconds = np.mean(sorted({(r["fold"], r["seconds"]) for r in rows}), axis=0)[1]
        lines.append(f"| {labels[arm]} | " + " | ".join(f"{mean[f'dice_{r}']:.3f}" for r in REGIONS) +
                     f" | **{np.mean([mean[f'dice_{r}'] for r in REGIONS]):.3f}** | " +
                     " | ".join(f"{mean[f'hd95_{r}']:.1f}" for r in REGIONS) + " | " +
                     " | ".join(f"{mean[f'ranked_dice_{r}']:.3f}" for r in REGIONS) +
                     f" | {np.mean([mean[f'ranked_hd95_{r}'] for r in REGIONS]):.1f} | {seconds:.0f} | "
                     f"{sum(r['true_et_removed'] for r in rows)} |")
    cases = sorted({r["subject_id"] for r in results[arms[0]]})
    lines += ["", "Per case (Dice ET / WT / TC, HD95 ET / WT / TC in mm):", "",
              "| case | fold | " + " | ".join(arms) + " |", "|---|---:|" + "---|" * len(arms)]
    for case in cases:
        cells = []
        for arm in arms:
            r = next(x for x in results[arm] if x["subject_id"] == case)
            cells.append(" / ".join(f"{r[f'dice_{g}']:.2f}" for g in REGIONS) + "; " +
                         " / ".join(f"{r[f'hd95_{g}']:.0f}" for g in REGIONS))
        fold = next(x["fold"] for x in results[arms[0]] if x["subject_id"] == case)
        lines.append(f"| {case} | {fold} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder of BraTS subjects (or a CSV of the explicit layout)")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--arms", nargs="+", default=[*ARMS, TORCH[0]], choices=[*ARMS, TORCH[0]])
    parser.add_argument("--workdir", default=os.path.join("runs", "real"))
    parser.add_argument("--out", default=os.path.join("experiments", "results", "real_cv.md"))
    parser.add_argument("--overlays", default="", help="a folder for one PNG per held-out case (axial, FLAIR)")
    args = parser.parse_args(argv)
    from experiments.ablations import _setup
    from experiments.quality_overlays import save_overlays

    _setup()  # as cmfl_jax.main does for a job: INFO logs on stdout, the persistent compilation cache
    start = time.perf_counter()
    command = " ".join(["python -m experiments.quality", *(argv if argv is not None else sys.argv[1:])])
    results, labels = {}, {**{a: ARMS[a][0] for a in ARMS}, TORCH[0]: TORCH[1]}
    for arm in args.arms:
        results[arm] = run_torch(args.data, args.folds, args.workdir) if arm == TORCH[0] else \
            run_arm(arm, args.data, args.folds, args.workdir)
    text = tables(results, labels)
    minutes = (time.perf_counter() - start) / 60
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    budget = ", ".join(f"{k}={v}" for k, v in BUDGET.items())
    header = (f"# Out-of-fold quality, {args.folds} folds of `{args.data}`\n\nCommand: `{command}` ({os.cpu_count()} "
              f"CPUs, load average {load} at the end; {minutes:.0f} min in this invocation, finished folds reused). "
              f"Budget per fold of every JAX arm: {budget}. Legacy BraTS rules (an empty prediction of an empty "
              f"region: Dice 1, HD95 0; one empty: Dice 0, HD95 373.13); lesion-wise: the 2023-2024 leaderboards'.\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(header + "\n" + text + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"command": command, "results": results, "labels": labels}, f, indent=1)
    if args.overlays:
        save_overlays(args.data, args.workdir, args.arms, args.overlays)
    log(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
