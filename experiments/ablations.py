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
import dataclasses
import datetime
import json
import os
import re
import sys
import time

import ml_collections
import numpy as np

from cmfl_jax.config_variants import load_config, override

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGIONS = ("ET", "WT", "TC")
SIZES = {"smoke": "smoke", "cpu-ish": None}  # --size -> variant of configs/demo.py
ALT_PAIRING = "t1-flair/t2-t1ce"
# CMFT runs per seed: name -> overrides of the CMFT stage config.
CMFT_RUNS = {"cycle": {}, "self": {"cmft.objective": "self"}, "alt-pairing": {"data.pairing": ALT_PAIRING}}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: CMFF config overrides, the CMFT run it starts from, and the paper's Dice.

    Attributes:
      name: as in the paper's tables.
      key: a folder name.
      overrides: dotted CMFF config path -> value; the variant *is* this (the code is the same for all).
      cmft: the CMFT run (``CMFT_RUNS``) that initialises S_A and S_B, or None (random initialisation).
      paper_2018: Dice ET, WT, TC, average on BraTS 2018 validation (Table 4), where the paper gives them.
      paper_2017: the same on BraTS 2017 validation (Table 2).
    """

    name: str
    key: str
    overrides: dict
    cmft: str | None
    paper_2018: tuple[float | None, ...]
    paper_2017: tuple[float | None, ...]


NO_FIGURE = (None, None, None, None)
# Dice figures copied from the paper (/work/shared/paper): Table 2 (BraTS 2017) and Table 4 (BraTS 2018);
# Table 4's extracted header lost its TC column, the order ET, WT, TC, average is the one of Table 2 and
# every row's average checks. The alternative pairing has only an average Dice, in the text of section 4.3.
VARIANTS = (
    Variant("S_A", "s_a", {"model.branches": "A"}, "cycle",
            (0.786, 0.807, 0.812, 0.802), (0.752, 0.799, 0.787, 0.779)),
    Variant("S_B", "s_b", {"model.branches": "B"}, "cycle",
            (0.444, 0.898, 0.704, 0.682), (0.429, 0.886, 0.656, 0.657)),
    Variant("S_A + S_B", "s_a_plus_s_b", {"model.branches": "A+B"}, "cycle",
            (0.721, 0.873, 0.797, 0.797), (0.672, 0.864, 0.759, 0.765)),
    Variant("Ours w/o MG", "wo_mg", {"model.attention": "none"}, "cycle",
            (0.781, 0.900, 0.822, 0.834), (0.762, 0.898, 0.808, 0.823)),
    Variant("Ours w CA", "w_ca", {"model.attention": "cbam"}, "cycle",
            (0.788, 0.901, 0.833, 0.841), (0.765, 0.896, 0.799, 0.820)),
    Variant("Ours_random", "random", {"init.mode": "random"}, None,
            (0.755, 0.873, 0.771, 0.800), (0.725, 0.870, 0.754, 0.783)),
    Variant("Ours_self", "self", {"init.mode": "self"}, "self",
            (0.767, 0.898, 0.832, 0.833), (0.751, 0.898, 0.779, 0.809)),
    Variant("Ours, pairs (T1, FLAIR) / (T2, T1c)", "alt_pairing", {"data.pairing": ALT_PAIRING}, "alt-pairing",
            (None, None, None, 0.822), NO_FIGURE),
    Variant("Ours", "ours", {}, "cycle",
            (0.791, 0.903, 0.836, 0.843), (0.757, 0.900, 0.828, 0.828)),
)
BY_KEY = {v.key: v for v in VARIANTS}
# The paper's orderings (section 4.2-4.3) that the table checks: (better, worse) by average Dice.
CLAIMS = (
    ("ours", "s_a_plus_s_b"), ("ours", "wo_mg"), ("ours", "w_ca"), ("s_a", "s_b"), ("s_a", "s_a_plus_s_b"),
    ("s_a_plus_s_b", "s_b"), ("ours", "self"), ("self", "random"), ("ours", "random"), ("ours", "alt_pairing"),
)


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


def _stats(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _paper(values: tuple[float | None, ...]) -> list[str]:
    return ["–" if v is None else f"{v:.3f}" for v in values]


def mean_dice(metrics: dict) -> float:
    return float(np.mean([metrics[f"dice_{r}"] for r in REGIONS]))


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    """The paper's layout: Dice ET, WT, TC and average per variant (mean ± std over seeds), paper figures beside.

    ``results``: variant key -> seed (str) -> metrics with ``dice_ET``, ``dice_WT``, ``dice_TC``.
    """
    head = ("| Method | Dice ET | Dice WT | Dice TC | Dice avg | paper 2018 ET | WT | TC | avg "
            "| paper 2017 ET | WT | TC | avg |")
    lines = [head, "|---" * 13 + "|"]
    groups = (("Key network branches, initialised by CMFT:", ("s_a", "s_b", "s_a_plus_s_b", "wo_mg", "w_ca")),
              ("Initialisation and modality pairing:", ("random", "self", "alt_pairing", "ours")))
    for title, keys in groups:
        lines.append(f"| *{title}* |" + " |" * 12)
        for key in keys:
            if key not in results:
                continue
            v, runs = BY_KEY[key], list(results[key].values())
            ours = [_stats([r[f"dice_{g}"] for r in runs]) for g in REGIONS] + [_stats([mean_dice(r) for r in runs])]
            lines.append(f"| {v.name} | " + " | ".join(ours + _paper(v.paper_2018) + _paper(v.paper_2017)) + " |")
    return "\n".join(lines)


def claims_markdown(results: dict[str, dict[str, dict]]) -> str:
    """Each ordering the paper reports (by average Dice), and whether it holds here (seed-mean)."""
    means = {k: float(np.mean([mean_dice(r) for r in runs.values()])) for k, runs in results.items()}
    stds = {k: float(np.std([mean_dice(r) for r in runs.values()])) for k, runs in results.items()}
    lines = []
    for better, worse in CLAIMS:
        if better in means and worse in means:
            holds = means[better] > means[worse]
            # With several seeds, a gap below the seeds' own spread says nothing either way.
            noise = abs(means[better] - means[worse]) < max(stds[better], stds[worse])
            lines.append(f"- {BY_KEY[better].name} > {BY_KEY[worse].name}: {means[better]:.3f} vs "
                         f"{means[worse]:.3f}, **{'holds' if holds else 'does not hold'}**"
                         + (" (gap below the std over seeds)" if noise else ""))
    order = sorted(means, key=means.get, reverse=True)
    paper = sorted((k for k in means if BY_KEY[k].paper_2018[3] is not None),
                   key=lambda k: BY_KEY[k].paper_2018[3], reverse=True)
    lines.append("- ranking here (avg Dice): " + " > ".join(BY_KEY[k].name for k in order))
    lines.append("- ranking in the paper (BraTS 2018): " + " > ".join(BY_KEY[k].name for k in paper))
    return "\n".join(lines)


# A run "has learnt ET" when its held-out ET Dice reaches this: every held-out subject of the built-in split has
# enhancing tumour, so a run that has not learnt the class scores near 0 there, one that has learnt it 0.6-0.9.
LEARNT_ET = 0.5


def convergence_markdown(results: dict[str, dict[str, dict]]) -> str:
    """Whether every variant has learnt ET in every seed (held-out ET Dice >= ``LEARNT_ET``), naming the runs that
    have not: the budget has converged only when none is left."""
    missing = [f"{BY_KEY[key].name} (seed {seed}: ET {m['dice_ET']:.3f})" for key, runs in results.items()
               for seed, m in runs.items() if m["dice_ET"] < LEARNT_ET]
    total = sum(len(runs) for runs in results.values())
    if not missing:
        return f"Converged: all {total} runs have learnt ET (held-out ET Dice >= {LEARNT_ET})."
    return (f"Not converged: {len(missing)} of {total} runs have not learnt ET (held-out ET Dice < {LEARNT_ET}): "
            + ", ".join(missing) + ".")


def write_report(out: str, results: dict[str, dict[str, dict]], settings: dict) -> str:
    """``<out>/ablations.md`` and ``<out>/ablations.json``; returns the Markdown."""
    from cmfl_jax.data.io import atomic_path

    os.makedirs(out, exist_ok=True)
    seeds = settings["seeds"]
    text = "\n".join([
        "# Ablations: Tables 2 and 4 of the paper on one budget",
        "",
        f"Data: {settings['data']}; {settings['n_train']} subjects train (both phases), the same "
        f"{settings['n_held_out']} held-out subjects score every variant (final checkpoint, BraTS Dice). "
        f"U-Net base {settings['base']}, depth {settings['depth']}, {settings['patch']} patches; CMFT "
        f"{settings['cmft_steps']} steps, CMFF {settings['steps']} steps; seed(s) {', '.join(map(str, seeds))}"
        + (" (mean ± std over seeds)." if len(seeds) > 1 else "."),
        f"Recipe (not the paper's): {settings['recipe']}.",
        f"Command: `{settings['command']}` ({settings['minutes']:.0f} min of training on 2 CPU cores"
        + (f", counting the runs of `{settings['continued_from']}` that these continue: CMFF has a constant learning "
           "rate and resumes exactly, so a continued run has the params of an uninterrupted one"
           if settings.get("continued_from") else "") + ").",
        "",
        "Paper figures: Dice on the BraTS 2018 (Table 4) and BraTS 2017 (Table 2) validation sets, for "
        "reference only: the synthetic data and the budget here are not comparable. Ours_voc (2D VOC weights) "
        "is left out; the paper gives the alternative pairing's average Dice only.",
        "",
        markdown_table(results),
        "",
        convergence_markdown(results),
        "",
        "The paper's orderings, here:",
        "",
        claims_markdown(results),
        "",
    ])
    with atomic_path(os.path.join(out, "ablations.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    with atomic_path(os.path.join(out, "ablations.json")) as tmp, open(tmp, "w") as f:
        json.dump({"settings": settings, "results": results}, f, indent=2, sort_keys=True)
    return text


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
