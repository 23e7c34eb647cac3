"""Agreement of this project's lesion-wise metrics with the official code, on real BraTS labels.

Predictions are shifted, eroded, dilated, lesion-dropped and lesion-added copies of each case's expert label.
Each pair is scored three ways: :mod:`cmfl_jax.lesion_metrics`; the official package ``brats-evaluation``
(panoptica, ``config_gli.yaml``); the organisers' 2023 script (``metrics.py`` of a checkout of
rachitsaluja/BraTS-2023-Metrics, challenge BraTS-GLI). Each official code runs in a virtual environment of its
own: ``<venv>/package`` (the package pins numpy below 2.3) and ``<venv>/script`` (the checkout's
``requirements.txt``: pandas 1.3.4, whose wheels stop at Python 3.10); ``--install`` creates them from PyPI.
The files are cropped to the tumour's box plus 16 voxels (a margin wider than any dilation: the figures do not
change, the official code runs faster) and written with the 2023+ labels (ET = 3).

    python experiments/official_metrics.py --data ../shared/data/brats18_train --script ../BraTS-2023-Metrics \
        [--cases 5] [--venv runs/official_venv] [--install] [--workdir runs/official_metrics]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np

ENVIRONMENTS = {"package": ["brats-evaluation==0.0.10"], "script": ["-r", "{script}/requirements.txt"]}
FIGURES = {  # ours -> (source, its key)
    "package": {"global_dsc": "global_dsc", "global_hd95": "global_hd95", "global_nsd": "global_nsd",
                "lesionwise_dsc": "lesionwise_dsc_mean", "lesionwise_hd95": "lesionwise_hd95_mean",
                "lesionwise_nsd": "lesionwise_nsd_mean", "f1": "all_instance_f1", "tp": "all_instance_tp",
                "fp": "all_instance_fp", "fn": "all_instance_fn"},
    "script": {"lesionwise_dice": "LesionWise_Score_Dice", "lesionwise_hd95": "LesionWise_Score_HD95",
               "num_tp": "Num_TP", "num_fp": "Num_FP", "num_fn": "Num_FN"},
}


def official(kind: str, pairs: list[tuple[str, str]], script: str) -> dict:
    """Run inside the ``kind`` venv: {prediction path: {region: {official key: value}}}."""
    out = {}
    if kind == "package":
        from brats_evaluation import config_path, evaluate_single_exam
        from panoptica import Panoptica_Evaluator
        evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
        for pred, label in pairs:
            res = evaluate_single_exam(pred, label, os.path.basename(label), evaluator)
            out[pred] = {}
            for region in ("ET", "TC", "WT"):
                r = res[region.lower()]  # as the package's metrics_parser names and reports them
                out[pred][region] = {
                    "global_dsc": r["global_bin_dsc"], "lesionwise_dsc_mean": r["sq_dsc"],
                    "global_hd95": 373.0 if np.isinf(r["global_bin_hd95"]) else r["global_bin_hd95"],
                    "lesionwise_hd95_mean": r["sq_hd95"], "all_instance_f1": r["rq"],
                    "global_nsd": r["global_bin_nsd"], "lesionwise_nsd_mean": r["sq_nsd"],
                    "all_instance_tp": r["tp"], "all_instance_fp": r["fp"], "all_instance_fn": r["fn"]}
        return out
    sys.path.insert(0, script)
    import metrics as brats2023
    for pred, label in pairs:
        df = brats2023.get_LesionWiseResults(pred, label, "BraTS-GLI").set_index("Labels")
        out[pred] = {region: {k: float(df.loc[region, k]) for k in FIGURES["script"].values()}
                     for region in ("ET", "TC", "WT")}
    return out


def variants(label: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Prediction-like copies of a 0/1/2/4 label map."""
    from scipy import ndimage

    from cmfl_jax.lesion_metrics import components
    tumour, out = label > 0, {"shifted": np.roll(label, (3, -2, 1), axis=(0, 1, 2))}
    out["eroded"] = np.where(ndimage.binary_erosion(tumour, iterations=2), label, 0)
    out["dilated"] = np.where(ndimage.binary_dilation(tumour, iterations=2) & ~tumour, 2, label)
    dropped, (et_cc, n) = label.copy(), components(label == 4)
    if n:  # the largest ET lesion becomes necrosis, the smallest disappears
        sizes = np.bincount(et_cc.ravel())[1:]
        dropped[et_cc == np.argmax(sizes) + 1] = 1
        dropped[et_cc == np.argmin(sizes) + 1] = 0
    out["dropped"] = dropped
    added = label.copy()
    for radius in (2, 4, 6):  # new lesions (tumour-core + enhancing) away from and next to the tumour
        centre = [rng.integers(radius + 1, s - radius - 1) for s in label.shape]
        box = tuple(slice(c - radius, c + radius + 1) for c in centre)
        ball = np.linalg.norm(np.indices(added[box].shape) - radius, axis=0) <= radius
        added[box] = np.where(ball & (added[box] == 0), 4 if radius < 6 else 1, added[box])
    out["added"] = added
    return out


def make_pairs(data: str, cases: int, workdir: str) -> list[tuple[str, str, str, str]]:
    """(case, variant, prediction path, label path) with the files written under ``workdir``."""
    import nibabel as nib
    rng, pairs = np.random.default_rng(0), []
    for case_dir in sorted(glob.glob(os.path.join(data, "*")))[:cases]:
        case = os.path.basename(case_dir)
        image = nib.load(glob.glob(os.path.join(case_dir, "*_seg.nii.gz"))[0])
        label = np.asarray(image.dataobj).astype(np.uint8)
        hits = np.argwhere(label > 0)
        box = tuple(slice(max(lo - 16, 0), hi + 17) for lo, hi in zip(hits.min(0), hits.max(0), strict=True))
        label = label[box]
        for name, pred in {"identity": label, **variants(label, rng)}.items():
            n = len(pairs)
            paths = [os.path.join(workdir, kind, f"BraTS-GLI-{n:05d}-000.nii.gz") for kind in ("pred", "label")]
            for path, arr in zip(paths, (pred, label), strict=True):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                nib.save(nib.Nifti1Image(np.where(arr == 4, 3, arr).astype(np.uint8), image.affine), path)
            pairs.append((case, name, *paths))
    return pairs


def ours(pred_path: str, label_path: str) -> dict:
    import nibabel as nib

    from cmfl_jax.lesion_metrics import brats_evaluation_metrics, leaderboard_lesionwise_metrics
    pred_img, label_img = nib.load(pred_path), nib.load(label_path)
    pred, label = (np.where(np.asarray(i.dataobj) == 3, 4, np.asarray(i.dataobj)) for i in (pred_img, label_img))
    spacing = tuple(float(z) for z in label_img.header.get_zooms()[:3])
    return {"package": brats_evaluation_metrics(pred, label, spacing),
            "script": leaderboard_lesionwise_metrics(pred, label, spacing, "GLI")}


def difference(a: float, b: float) -> float:
    if (np.isnan(a) and np.isnan(b)) or a == b:
        return 0.0
    return abs(a - b) if np.isfinite(a) and np.isfinite(b) else float("inf")


def runs(interpreter: str) -> bool:
    try:
        return subprocess.run([interpreter, "--version"], capture_output=True).returncode == 0
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--script", required=True, help="a checkout of rachitsaluja/BraTS-2023-Metrics")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--venv", default="runs/official_venv")
    parser.add_argument("--install", action="store_true", help=f"create the environments with pip: {ENVIRONMENTS}")
    parser.add_argument("--script-python", default="python3.10",
                        help="a Python <= 3.10 for <venv>/script (pandas 1.3.4 has no wheels for later ones)")
    parser.add_argument("--workdir", default="runs/official_metrics")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # kind, pairs.json
    args = parser.parse_args()
    if args.worker:  # inside an official venv
        kind, request = args.worker
        json.dump(official(kind, json.load(open(request)), args.script), open(f"{request}.{kind}", "w"))
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.install and not os.path.exists(os.path.join(args.venv, "script", "bin", "python")) \
            and not runs(args.script_python):
        sys.exit(f"{args.script_python} does not run: give a Python <= 3.10 as --script-python")
    os.makedirs(args.workdir, exist_ok=True)
    pairs = make_pairs(args.data, args.cases, args.workdir)
    request = os.path.join(args.workdir, "pairs.json")
    json.dump([p[2:] for p in pairs], open(request, "w"))
    theirs = {}
    for kind, requirements in ENVIRONMENTS.items():
        python = os.path.join(args.venv, kind, "bin", "python")
        if args.install and not os.path.exists(python):
            interpreter = args.script_python if kind == "script" else sys.executable
            subprocess.run([interpreter, "-m", "venv", os.path.join(args.venv, kind)], check=True)
            pins = [r.format(script=args.script) for r in requirements]
            subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=True)
        if not os.path.exists(python):
            sys.exit(f"{python} not found: --install creates it")
        with open(os.path.join(args.workdir, f"{kind}.log"), "w") as log:  # the official code's warnings
            subprocess.run([python, os.path.abspath(__file__), "--worker", kind, request, "--data", args.data,
                            "--script", os.path.abspath(args.script)], check=True, stdout=log, stderr=log)
        theirs[kind] = json.load(open(f"{request}.{kind}"))
    worst: dict[str, float] = {}
    print("| case | prediction | region | source | figure | ours | official | abs diff |\n" + "|---" * 8 + "|")
    for case, name, pred, label in pairs:
        mine = ours(pred, label)
        for source, keys in FIGURES.items():
            for region in ("ET", "TC", "WT"):
                for key, their_key in keys.items():
                    a, b = float(mine[source][region][key]), float(theirs[source][pred][region][their_key])
                    d = difference(a, b)
                    worst[f"{source}: {key}"] = max(worst.get(f"{source}: {key}", 0.0), d)
                    if d > 1e-6:
                        print(f"| {case} | {name} | {region} | {source} | {key} | {a:.6g} | {b:.6g} | {d:.3g} |")
    print(f"\n{len(pairs)} prediction/label pairs, regions ET, TC, WT; max abs difference per figure:\n")
    print("| figure | max abs difference |\n|---|---|")
    for key, d in worst.items():
        print(f"| {key} | {d:.3g} |")


if __name__ == "__main__":
    main()
