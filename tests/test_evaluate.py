"""Evaluation job: per-subject BraTS metrics and the paper's summary table, equal to a direct computation."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from cmfl_jax.config_variants import load_config
from cmfl_jax.data.layouts import discover, to_internal
from cmfl_jax.errors import CMFLError
from cmfl_jax.jobs.evaluate import run
from cmfl_jax.lesion_metrics import brats_evaluation_metrics, leaderboard_lesionwise_metrics
from cmfl_jax.metrics import brats_metrics

from .conftest import write_tiny_dataset
from .test_cli import run_cli


def write_predictions(root, out, layout_et):
    """Per subject: the label itself, the label shifted by 2 voxels, an empty map (in the dataset's convention)."""
    out.mkdir()
    arrays = {}
    for i, subject in enumerate(discover(str(root), require_labels=True)):
        img = nib.load(subject.label)
        label = np.asarray(img.dataobj).astype(np.uint8)
        pred = [label, np.roll(label, 2, axis=0), np.zeros_like(label)][i % 3]
        nib.save(nib.Nifti1Image(pred, img.affine, img.header), str(out / f"{subject.subject_id}.nii.gz"))
        arrays[subject.subject_id] = (to_internal(pred, layout_et), to_internal(label, layout_et),
                                      img.header.get_zooms()[:3])
    return arrays


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("layout, et_label", [("brats2018", 4), ("brats2023", 3)])
def test_tables_equal_a_direct_computation(tmp_path, layout, et_label):
    write_tiny_dataset(tmp_path / "data", n=3, layout=layout)
    arrays = write_predictions(tmp_path / "data", tmp_path / "pred", et_label)
    config = load_config("evaluate")
    config.data.root, config.predictions = str(tmp_path / "data"), str(tmp_path / "pred")
    run(config, str(tmp_path / "w"))
    rows = {r["subject_id"]: r for r in read_csv(tmp_path / "w" / "evaluation_per_subject.csv")}
    assert rows.keys() == arrays.keys()
    direct = {sid: brats_metrics(p, t, spacing) for sid, (p, t, spacing) in arrays.items()}
    for sid, metrics in direct.items():
        for region, values in metrics.items():
            for name, value in values.items():
                assert float(rows[sid][f"{name}_{region}"]) == pytest.approx(value, rel=1e-6, abs=1e-9)
    for sid, (p, t, spacing) in arrays.items():  # both lesion-wise families, beside the legacy columns
        ranked, package = leaderboard_lesionwise_metrics(p, t, spacing), brats_evaluation_metrics(p, t, spacing)
        for region in ("ET", "WT", "TC"):
            expected = {f"ranked_dice_{region}": ranked[region]["lesionwise_dice"],
                        f"ranked_hd95_{region}": ranked[region]["lesionwise_hd95"],
                        f"lesion_dice_{region}": package[region]["lesionwise_dsc"],
                        f"lesion_hd95_{region}": min(package[region]["lesionwise_hd95"], 373.0),
                        f"lesion_f1_{region}": package[region]["f1"]}
            for column, value in expected.items():
                assert float(rows[sid][column]) == pytest.approx(value, rel=1e-6, nan_ok=True), column
    perfect = direct[sorted(direct)[0]]
    assert all(perfect[r]["dice"] == 1.0 and perfect[r]["hd95"] == 0.0 for r in perfect)
    summary = {r["statistic"]: r for r in read_csv(tmp_path / "w" / "evaluation_summary.csv")}
    for region in ("ET", "WT", "TC"):
        dice = np.array([direct[s][region]["dice"] for s in sorted(direct)])
        assert float(summary["mean"][f"dice_{region}"]) == pytest.approx(dice.mean(), rel=1e-6)
        assert float(summary["std"][f"dice_{region}"]) == pytest.approx(dice.std(), rel=1e-6, abs=1e-12)
        assert float(summary["median"][f"dice_{region}"]) == pytest.approx(np.median(dice), rel=1e-6)
        assert float(summary["25quantile"][f"dice_{region}"]) == pytest.approx(np.percentile(dice, 25), rel=1e-6)
    average = np.mean([[direct[s][r]["hd95"] for r in ("ET", "WT", "TC")] for s in sorted(direct)], axis=1)
    assert float(summary["75quantile"]["hd95_average"]) == pytest.approx(np.percentile(average, 75), rel=1e-6)
    markdown = (tmp_path / "w" / "evaluation_summary.md").read_text().splitlines()
    assert markdown[0].startswith("| | Dice ET | Dice WT | Dice TC | Dice avg | HD95 ET")
    assert [line.split("|")[1].strip() for line in markdown[2:7]] == ["mean", "std", "median", "25quantile",
                                                                     "75quantile"]
    text = "\n".join(markdown)
    assert "2023-2024 leaderboards" in text and "brats-evaluation" in text and text.count("| | Dice ET") == 3
    assert float(summary["mean"]["ranked_dice_average"]) <= 1.0 and "lesion_f1_ET" in summary["mean"]
    assert (tmp_path / "w" / "evaluation_boxplot.png").stat().st_size > 1000


def test_missing_prediction_and_shape_mismatch_name_the_file(tmp_path):
    write_tiny_dataset(tmp_path / "data", n=2)
    write_predictions(tmp_path / "data", tmp_path / "pred", 4)
    config = load_config("evaluate")
    config.data.root, config.predictions = str(tmp_path / "data"), str(tmp_path / "pred")
    victim = sorted((tmp_path / "pred").iterdir())[1]
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(victim))
    with pytest.raises(CMFLError, match=rf"{victim.name}: shape \(4, 4, 4\) differs from the label's"):
        run(config, str(tmp_path / "w"))
    victim.unlink()
    with pytest.raises(CMFLError, match=rf"{victim.name}: prediction not found \(1 of 2 subjects have none\)"):
        run(config, str(tmp_path / "w"))


@pytest.mark.slow
def test_evaluate_cli(tmp_path):
    write_tiny_dataset(tmp_path / "data", n=2)
    write_predictions(tmp_path / "data", tmp_path / "pred", 4)
    args = ("--config=configs/evaluate.py", f"--workdir={tmp_path / 'w'}", f"--config.data.root={tmp_path / 'data'}")
    r = run_cli(*args, f"--config.predictions={tmp_path / 'pred'}", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert "| mean | 1.0000 |" not in r.stdout and "| mean |" in r.stdout and "2 subjects" in r.stdout
    bad = run_cli(*args, f"--config.predictions={tmp_path / 'none'}", cache=tmp_path / "cache")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"cmfl_jax: error: {tmp_path / 'none'}: predictions folder (config.predictions) does not exist"]
