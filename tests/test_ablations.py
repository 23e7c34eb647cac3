"""experiments/ablations.py: the runner at smoke size (CMFT reused, finished runs reused) and its table."""

from __future__ import annotations

import json
import os

import pytest

from experiments import ablations, ablations_report


def parse_rows(markdown: str) -> dict[str, list[str]]:
    """Method -> its cells, for the rows of the results table."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| Method") and not line.startswith("| *"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_markdown_table_mean_std_and_paper_figures():
    results = {
        "ours": {"0": {"dice_ET": 0.5, "dice_WT": 0.8, "dice_TC": 0.6}, "1": {"dice_ET": 0.7, "dice_WT": 0.8,
                                                                              "dice_TC": 0.6}},
        "alt_pairing": {"0": {"dice_ET": 0.1, "dice_WT": 0.2, "dice_TC": 0.3}},
    }
    rows = parse_rows(ablations_report.markdown_table(results))
    assert rows["Ours"][:4] == ["0.600 ± 0.100", "0.800 ± 0.000", "0.600 ± 0.000", "0.667 ± 0.033"]
    assert rows["Ours"][4:] == ["0.791", "0.903", "0.836", "0.843", "0.757", "0.900", "0.828", "0.828"]
    assert rows["Ours, pairs (T1, FLAIR) / (T2, T1c)"] == ["0.100", "0.200", "0.300", "0.200", "–", "–", "–",
                                                           "0.822", "–", "–", "–", "–"]
    claims = ablations_report.claims_markdown(results)
    assert "Ours > Ours, pairs (T1, FLAIR) / (T2, T1c): 0.667 vs 0.200, **holds**" in claims


def test_convergence_names_the_runs_without_et():
    learnt = {"dice_ET": 0.8, "dice_WT": 0.9, "dice_TC": 0.9}
    results = {"ours": {"0": learnt, "1": {**learnt, "dice_ET": 0.047}}, "s_b": {"0": {**learnt, "dice_ET": 0.5}}}
    assert ablations_report.convergence_markdown(results) == (
        "Not converged: 1 of 3 runs have not learnt ET (held-out ET Dice < 0.5): Ours (seed 1: ET 0.047).")
    results["ours"]["1"] = learnt
    assert ablations_report.convergence_markdown(results) == (
        "Converged: all 3 runs have learnt ET (held-out ET Dice >= 0.5).")


def test_paper_averages_match_their_rows():
    """The Dice copied from Tables 2 and 4: each row's average is the mean of its ET, WT and TC."""
    for v in ablations.VARIANTS:
        for figures in (v.paper_2018, v.paper_2017):
            if None not in figures:
                assert abs(sum(figures[:3]) / 3 - figures[3]) <= 0.0015, v.name


@pytest.mark.slow
def test_runner_at_smoke_size(tmp_path):
    out, work = tmp_path / "out", tmp_path / "runs"
    args = dict(size="smoke", steps=4, cmft_steps=2, seeds=[0], out=str(out), workdir=str(work),
                variants=["random", "s_a", "ours"])
    text = ablations.run_ablations(**args)
    rows = parse_rows(text)
    assert set(rows) == {"Ours_random", "S_A", "Ours"}
    for cells in rows.values():
        assert all(0.0 <= float(c) <= 1.0 for c in cells[:4])
    assert (out / "ablations.md").read_text() == text
    # The smoke configs' recipe (configs/cmff.py and cmft.py defaults), stated because it is not always the paper's.
    assert ("Recipe (not the paper's): CMFF Adam lr 0.0001, Dice per branch; CMFT Adam lr 0.0001 (generators), "
            "0.0001 (discriminators); patch centres in the tumour with probability 1 (else anywhere in the brain).") \
        in text
    saved = json.loads((out / "ablations.json").read_text())
    assert set(saved["results"]) == {"random", "s_a", "ours"} and saved["settings"]["n_held_out"] == 1
    seed_dir = work / "smoke-cmft2-cmff4" / "seed0"
    assert sorted(os.listdir(seed_dir)) == ["cmff_ours", "cmff_random", "cmff_s_a", "cmft_cycle", "split.json",
                                            "train.csv", "validation.csv"]  # one CMFT run serves S_A and Ours
    for run in ("cmft_cycle", "cmff_ours"):  # every run reads the one split of the seed's folder
        assert json.loads((seed_dir / run / "config.json").read_text())["data"]["split"]["file"] == \
            str(seed_dir / "split.json")
    assert json.loads((seed_dir / "cmff_s_a" / "config.json").read_text())["model"]["branches"] == "A"
    assert json.loads((seed_dir / "cmff_ours" / "config.json").read_text())["init"]["cmft_workdir"] == \
        str(seed_dir / "cmft_cycle")

    again = ablations.run_ablations(**args)  # every run finished: reused, same numbers
    assert parse_rows(again) == rows
    runs = json.loads((out / "ablations.json").read_text())["settings"]["runs"]
    assert sorted(runs) == ["seed0/cmff_ours", "seed0/cmff_random", "seed0/cmff_s_a", "seed0/cmft_cycle"]
    assert all(r["reused"] and r["seconds"] > 0 for r in runs.values())

    # A longer budget continues these runs from their final checkpoints (exact resume, constant rate): the first
    # 4 logged steps are the 4-step run's, and its training time counts.
    longer = dict(args, steps=6, variants=["s_a"], continue_from=str(work / "smoke-cmft2-cmff4"))
    ablations.run_ablations(**longer)
    source, continued = (work / budget / "seed0" / "cmff_s_a" for budget in ("smoke-cmft2-cmff4", "smoke-cmft2-cmff6"))
    logged = [json.loads(x) for x in open(continued / "metrics.jsonl")]
    assert [x["step"] for x in logged if "train/loss" in x] == [1, 2, 3, 4, 5, 6]
    assert [x for x in logged if x["step"] <= 4] == [json.loads(x) for x in open(source / "metrics.jsonl")]
    settings = json.loads((out / "ablations.json").read_text())["settings"]
    assert settings["runs"]["seed0/cmff_s_a"]["seconds"] > runs["seed0/cmff_s_a"]["seconds"]
    assert settings["continued_from"] == longer["continue_from"]
    with pytest.raises(SystemExit, match="needs CMFT 3 steps"):
        ablations.run_ablations(**dict(longer, cmft_steps=3))
