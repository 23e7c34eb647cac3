"""configs/demo.py:smoke end to end through the console command: every artefact, the metrics table, reuse."""

from __future__ import annotations

import csv
import json
import os
import re

from .test_cli import run_cli

REGIONS = ("ET", "WT", "TC")


def parse_summary_table(text: str) -> dict[str, dict[str, float]]:
    """``{statistic: {column: value}}`` from the (first) Markdown table of the evaluate job's layout."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [line for line in lines[start:end] if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table = {}
    for line in rows[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = {h: float(v) for h, v in zip(header[1:], cells[1:], strict=True)}
    return table


def test_demo_smoke_end_to_end(tmp_path):
    work = tmp_path / "demo"
    args = ("--config=configs/demo.py:smoke", f"--workdir={work}")
    r = run_cli(*args, cache=tmp_path / "cache", timeout=300, console=True)  # cmfl-jax, as pip install -e . gives it
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == ""

    with open(work / "validation.csv") as f:
        held_out = [row["subject_id"] for row in csv.DictReader(f)]
    with open(work / "train.csv") as f:
        train = [row["subject_id"] for row in csv.DictReader(f)]
    assert held_out and train and not set(held_out) & set(train)
    split = json.loads((work / "split.json").read_text())
    assert (split["train"], split["validation"], split["folds"]) == (sorted(train), sorted(held_out), 4)
    for stage in ("cmft", "cmff"):  # both training stages read the demo's split.json, the data root is the whole
        data = json.loads((work / stage / "config.json").read_text())["data"]
        assert data["split"]["file"] == str(work / "split.json") and data["root"] == ""
    assert os.listdir(work / "cmft" / "checkpoints") and "6" in os.listdir(work / "cmft" / "checkpoints")
    assert os.listdir(work / "cmff" / "final") == ["6"] and len(os.listdir(work / "cmff" / "best")) == 1
    predictions = sorted(os.listdir(work / "predict" / "predictions"))
    assert predictions == sorted(f"{s}.nii.gz" for s in held_out)  # only the subjects CMFF did not train on
    for name in ("evaluation_per_subject.csv", "evaluation_summary.csv", "evaluation_summary.md"):
        assert (work / "evaluate" / name).is_file(), name
    bundle = work / "export" / "bundle"
    assert (bundle / "bundle.json").is_file() and any(p.endswith(".stablehlo") for p in os.listdir(bundle))

    summary = (work / "summary.md").read_text()
    assert summary in r.stdout  # the one summary, printed and written
    # The stages' own printouts went to the log, so the summary holds the only bare tables: the legacy metrics and
    # the two lesion-wise families.
    means = lambda text: sum(line.startswith("| mean |") for line in text.splitlines())
    assert means(r.stdout) == means(summary) == 3
    table = parse_summary_table(summary)
    assert set(table) == {"mean", "std", "median", "25quantile", "75quantile"}
    for region in REGIONS:
        assert 0.0 <= table["mean"][f"Dice {region}"] <= 1.0
    assert re.search(r"held out \(CMFF validation fold 0 of 4\): 1 subjects", summary)

    again = run_cli(*args, cache=tmp_path / "cache", timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished before with this config, reused") == 5
    assert parse_summary_table((work / "summary.md").read_text()) == table
