"""The paper's ablations (Tables 2 and 4) on one data root, one training budget and one set of seeds.

Branch variants (``config.model.branches`` / ``config.model.attention``): S_A, S_B, S_A + S_B, Ours w/o MG,
Ours w CA, Ours; initialisation variants (``config.init.mode``): Ours_random, Ours_self (from a CMFT run with
``cmft.objective=self``), Ours (from the CMFT CycleGAN); and the alternative modality pairing
(T1, FLAIR) / (T2, T1c) (``data.pairing``, with its own CMFT run). Ours_voc needs 2D VOC weights that cannot
be downloaded here and is left out. Per seed there are three CMFT runs (cycle, self, alternative pairing),
shared by every CMFF variant that starts from them.

Everything else is the demo's (``configs/demo.py``; ``--size smoke`` is its ``:smoke``, ``cpu-ish`` its
default): data, U-Net, optimiser, and the held-out fold (the validation fold of ``data.split``, written to
each seed's folder as ``split.json`` and handed to every run, the same for every variant and seed; CMFT sees
only the training subjects). A variant's score is the BraTS metrics of its
final checkpoint on the held-out subjects (CMFF's validation at its last step: whole volumes by sliding
windows), not of the best checkpoint, which is chosen on those same subjects. Finished runs are reused
when the script runs again (a CMFT run whose last checkpoint is at its step count, a CMFF run with a
``final/`` checkpoint); an interrupted one resumes from its checkpoint.

    python -m experiments.ablations --size cpu-ish --steps 300 --cmft_steps 100 --seeds 0 \
        --out experiments/results

Writes ``<out>/ablations.md`` (the table, the paper's figures beside it, and which of the paper's
orderings hold) and ``<out>/ablations.json`` (settings, per-seed metrics, run times).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import sys
import time

import ml_collections

from cmfl_jax.config_variants import load_config, override
from experiments.ablations_report import ALT_PAIRING, BY_KEY, VARIANTS, Variant, write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"smoke": "smoke", "cpu-ish": None}  # --size -> variant of configs/demo.py

# CMFT runs per seed: name -> overrides of the CMFT stage config.
CMFT_RUNS = {"cycle": {}, "self": {"cmft.objective": "self"}, "alt-pairing": {"data.pairing": ALT_PAIRING}}


def base_stages(size: str, steps: int, cmft_steps: int, seed: int, data_root: str, workdir: str
                ) -> tuple[dict, list, list]:
    """The demo's CMFT and CMFF stage configs at this size, budget and seed; (stages, train, held-out)."""
    from cmfl_jax.jobs import demo

    config = copy.deepcopy(demo_config(size))
    config.unlock()
    config.seed = seed
    config.data.root = data_root
    config.cmft.train.steps = cmft_steps
    config.cmff.train.steps = steps
    config.cmff.val.every = steps  # one validation, at the end: the score
    config.cmft.train.preview_every = 0
    train, held_out, paths = demo.write_split(config, workdir)  # split.json, train.csv, validation.csv
    return demo.stage_configs(config, workdir, paths), train, held_out


def demo_config(size: str) -> ml_collections.ConfigDict:
    return load_config(os.path.join(REPO, "configs", f"demo.py:{SIZES[size] or ''}"))


def _train(name: str, config: ml_collections.ConfigDict, workdir: str, what: str) -> dict:
    """Train ``config`` with the job ``name`` unless finished; ``{"seconds", "reused"}`` (seconds of its training)."""
    from cmfl_jax import stage_runner

    record = os.path.join(workdir, "ablation_run.json")
    earlier = None  # None: not trained by this script; a run continued (--continue_from) counts its earlier time
    if os.path.exists(record):
        with open(record) as f:
            earlier = json.load(f)["seconds"]
    if stage_runner.finished(name, config, workdir):
        return {"seconds": earlier, "reused": True}
    log(f"{what}: training {config.train.steps} steps in {workdir}")
    start = time.perf_counter()
    stage_runner.run_stage(name, config, workdir)
    if not stage_runner.finished(name, config, workdir):
        raise SystemExit(f"{workdir}: stopped before its last step; run the same command to resume")
    seconds = (earlier or 0.0) + time.perf_counter() - start
    with open(record, "w") as f:
        json.dump({"seconds": seconds}, f)
    return {"seconds": seconds, "reused": False}


def train_cmft(stage: ml_collections.ConfigDict, run: str, workdir: str) -> dict:
    """The CMFT run ``run`` (``CMFT_RUNS``) in ``workdir``, reused when finished; ``{"seconds", "reused"}``."""
    config = copy.deepcopy(stage)
    override(config, CMFT_RUNS[run])
    return _train("cmft", config, workdir, f"CMFT {run}")


def train_variant(stage: ml_collections.ConfigDict, variant: Variant, workdir: str) -> tuple[dict, dict]:
    """Train one CMFF variant (reused when finished); (its final held-out metrics, ``{"seconds", "reused"}``)."""
    from cmfl_jax import checkpoints

    config = copy.deepcopy(stage)
    override(config, variant.overrides)
    if variant.cmft is not None:
        config.init.cmft_workdir = os.path.join(os.path.dirname(workdir), f"cmft_{variant.cmft}")
    run = _train("cmff", config, workdir, f"CMFF {variant.name}")
    manager = checkpoints.make_manager(workdir, None, "final", read_only=True)
    try:
        meta = checkpoints.read_meta(manager)
    finally:
        manager.close()
    return meta["val"], run


def log(message: str) -> None:
    print(f"[ablations {datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def continue_runs(source: str, budget: str, seeds: list[int], config: ml_collections.ConfigDict, steps: int,
                  cmft_steps: int) -> None:
    """Copy the seeds' runs of the shorter budget ``source`` into ``budget``: every CMFF run then resumes from its
    final checkpoint. With a constant CMFF learning rate and an exact resume this gives the params an
    uninterrupted run of ``steps`` steps would (a decaying rate or another CMFT budget would not)."""
    import shutil

    match = re.search(r"-cmft(\d+)-cmff(\d+)$", os.path.normpath(source))
    if match is None or not os.path.isdir(source):
        raise SystemExit(f"--continue_from {source}: not a budget folder of this script (<size>-cmft<N>-cmff<M>)")
    if int(match.group(1)) != cmft_steps or int(match.group(2)) > steps:
        raise SystemExit(f"--continue_from {source}: needs CMFT {cmft_steps} steps and at most {steps} CMFF steps")
    if config.cmff.cmff.decay_start >= 0:
        raise SystemExit(f"--continue_from {source}: the CMFF learning rate decays over the run's length, so a "
                         "longer run is not a continuation of a shorter one")
    for seed in seeds:
        src, dst = os.path.join(source, f"seed{seed}"), os.path.join(budget, f"seed{seed}")
        if os.path.isdir(src) and not os.path.exists(dst):
            log(f"seed {seed}: continuing the runs of {src}")
            shutil.copytree(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)


def run_ablations(size: str, steps: int, cmft_steps: int, seeds: list[int], out: str, workdir: str,
                  variants: list[str], data_root: str = "", command: str = "", continue_from: str = "") -> str:
    """Train every CMFT run and CMFF variant that is not finished yet, then write the report."""
    start = time.perf_counter()
    chosen = [BY_KEY[k] for k in variants]
    results: dict[str, dict[str, dict]] = {v.key: {} for v in chosen}
    runs: dict[str, dict] = {}
    budget = os.path.join(workdir, f"{size}-cmft{cmft_steps}-cmff{steps}")
    if continue_from:
        continue_runs(continue_from, budget, seeds, demo_config(size), steps, cmft_steps)
    for seed in seeds:
        seed_dir = os.path.join(budget, f"seed{seed}")
        stages, train, held_out = base_stages(size, steps, cmft_steps, seed, data_root, seed_dir)
        for name in sorted({v.cmft for v in chosen if v.cmft}):
            runs[f"seed{seed}/cmft_{name}"] = train_cmft(stages["cmft"], name, os.path.join(seed_dir, f"cmft_{name}"))
        for v in chosen:
            metrics, runs[f"seed{seed}/cmff_{v.key}"] = train_variant(stages["cmff"], v,
                                                                      os.path.join(seed_dir, f"cmff_{v.key}"))
            results[v.key][str(seed)] = metrics
            log(f"seed {seed} {v.name}: Dice ET {metrics['dice_ET']:.3f} WT {metrics['dice_WT']:.3f} "
                f"TC {metrics['dice_TC']:.3f}")
    c = stages["cmff"]
    settings = {
        "size": size, "steps": steps, "cmft_steps": cmft_steps, "seeds": seeds, "variants": variants,
        "data": data_root or f"built-in synthetic, {c.data.synthetic.n} subjects at "
                             f"{'x'.join(map(str, c.data.synthetic.shape))}",
        "n_train": len(train), "n_held_out": len(held_out), "held_out": [s.subject_id for s in held_out],
        "base": c.model.base, "depth": c.model.depth, "patch": "x".join(map(str, c.data.patch_size)) + "",
        "recipe": recipe(stages),
        "command": command, "continued_from": continue_from,
        "runs": runs, "minutes": sum(r["seconds"] or 0.0 for r in runs.values()) / 60,
        "minutes_this_invocation": (time.perf_counter() - start) / 60,
    }
    return write_report(out, results, settings)


def recipe(stages: dict) -> str:
    """The training recipe every variant shares, in words: what differs from the paper's (Adam 1e-4, Dice only,
    patches centred in the tumour)."""
    cmff, cmft = stages["cmff"], stages["cmft"]
    loss = "Dice" + (f" + {cmff.cmff.ce_weight:g} x cross-entropy" if cmff.cmff.ce_weight else "")
    return (f"CMFF Adam lr {cmff.cmff.lr:g}, {loss} per branch; CMFT Adam lr {cmft.cmft.g_lr:g} (generators), "
            f"{cmft.cmft.d_lr:g} (discriminators); patch centres in the tumour with probability "
            f"{cmff.data.tumour_prob:g} (else anywhere in the brain)")


def _setup() -> None:
    """What ``cmfl_jax.main`` does for a job: INFO logs on stdout, the persistent compilation cache."""
    import jax
    from absl import flags, logging

    from cmfl_jax.data.cache import default_cache_dir

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain reads absl flags; this script has none of its own
    logging.get_absl_handler().python_handler.stream = sys.stdout
    logging.set_verbosity(logging.INFO)
    jax.config.update("jax_compilation_cache_dir", os.path.join(default_cache_dir(), "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu-ish")
    parser.add_argument("--steps", type=int, default=300, help="CMFF steps of every variant")
    parser.add_argument("--cmft_steps", type=int, default=100, help="steps of every CMFT run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=[v.key for v in VARIANTS], choices=list(BY_KEY))
    parser.add_argument("--data_root", default="", help="a BraTS folder or CSV ('': the built-in synthetic set)")
    parser.add_argument("--out", default=os.path.join("experiments", "results"), help="where the table goes")
    parser.add_argument("--workdir", default=os.path.join("runs", "ablations"), help="where the runs go")
    parser.add_argument("--continue_from", default="",
                        help="a shorter budget's folder (<workdir>/<size>-cmft<N>-cmff<M>): its CMFF runs go on "
                             "from their final checkpoints instead of starting again")
    args = parser.parse_args(argv)
    _setup()
    command = "python -m experiments.ablations " + " ".join(sys.argv[1:] if argv is None else argv)
    print(run_ablations(args.size, args.steps, args.cmft_steps, args.seeds, args.out, args.workdir, args.variants,
                        args.data_root, command, args.continue_from))


if __name__ == "__main__":
    main()
