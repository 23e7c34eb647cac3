"""The rows of experiments/ablations.py with the paper's figures, and its report: the paper's table layout with
its figures beside ours, which of its orderings hold, and whether every run has learnt ET."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

REGIONS = ("ET", "WT", "TC")
ALT_PAIRING = "t1-flair/t2-t1ce"


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
