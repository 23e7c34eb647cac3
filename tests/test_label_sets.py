"""Label sets (BraTS 2017-2021, 2023, 2024 GLI post-treatment with RC, 2024 PED): the table, discovery of every
2023+ task's names, prepare, predict in the release's values and evaluate, a 5-class training, wrong values."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax import checkpoints, runtime
from cmfl_jax.config_variants import load_config
from cmfl_jax.data.csv_layout import read_subject_csv, write_subject_csv
from cmfl_jax.data.io import load_subject, read_nifti, write_nifti
from cmfl_jax.data.layouts import discover
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.stablehlo import VolumePredictor
from cmfl_jax.jobs import evaluate, predict, prepare
from cmfl_jax.label_classes import check_output_classes, classes_to_labels, label_targets, labels_to_classes
from cmfl_jax.label_sets import LABEL_SETS, extends, to_dataset, to_internal
from cmfl_jax.metrics import brats_metrics

from .conftest import TINY_SHAPE, tiny_label
from .test_bad_inputs import assert_one_line_error
from .test_cli import run_cli

SUFFIXES_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
# Each set with a naming of its release (the 2023 sets once per task) and its test root's subject ids.
CASES = {
    "brats2021": ["BraTS2021_00000", "BraTS2021_00001"],
    "brats2023": ["BraTS-GLI-00000-000", "BraTS-MEN-00001-000", "BraTS-MET-00002-000", "BraTS-SSA-00003-000"],
    "brats2024_gli": ["BraTS-GLI-02000-100", "BraTS-GLI-02001-101"],
    "brats2024_ped": ["BraTS-PED-00010-000", "BraTS-PED-00011-000"],
}


def internal_truth(name: str) -> np.ndarray:
    """The conftest's cube tumour, plus a cystic component (PED) and a resection cavity (GLI 2024): internal."""
    label = tiny_label()
    if 3 in LABEL_SETS[name].classes:
        label[7:9, 7:9, 7:9] = 3  # inside the core
    if 5 in LABEL_SETS[name].classes:
        label[3:6, 3:6, 3:6] = 5  # away from the tumour, inside the brain (the zero border is [:2])
    return label


def write_subject(root, sid: str, label: np.ndarray | None, seed: int = 0) -> None:
    """One subject named as its release names it (classic ``_t1``, or 2023+ ``-t1n``), ``label`` as given."""
    rng = np.random.default_rng(seed)
    classic = not sid.startswith("BraTS-")
    sep, suffixes = ("_", {m: m for m in SUFFIXES_2023}) if classic else ("-", SUFFIXES_2023)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for suffix in suffixes.values():
        volume = (rng.normal(size=TINY_SHAPE) * 10 + 100).astype(np.float32)
        volume[:2] = 0
        write_nifti(os.path.join(root, sid, f"{sid}{sep}{suffix}.nii.gz"), volume, affine)
    if label is not None:
        write_nifti(os.path.join(root, sid, f"{sid}{sep}seg.nii.gz"), label, affine)


def write_set(root, name: str) -> list[str]:
    for i, sid in enumerate(CASES[name]):
        write_subject(root, sid, to_dataset(internal_truth(name), name), seed=i)
    return CASES[name]


def test_each_set_is_the_releases_convention():
    gli, ped = LABEL_SETS["brats2024_gli"], LABEL_SETS["brats2024_ped"]
    assert LABEL_SETS["brats2021"].values == (0, 1, 2, 4) and LABEL_SETS["brats2023"].values == (0, 1, 2, 3)
    assert dict(gli.regions) == {"ET": (3,), "WT": (1, 2, 3), "TC": (1, 3), "RC": (4,)}  # RC is not tumour
    assert {v: n for v, (n, _) in gli.labels.items()} == {1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"}
    assert {v: n for v, (n, _) in ped.labels.items()} == {1: "ET", 2: "NET", 3: "CC", 4: "ED"}
    # The regions the 2024 PED scorer uses, on the release's values.
    assert dict(ped.regions) == {"ET": (1,), "WT": (1, 2, 3, 4), "TC": (1, 2, 3), "NETC": (2,), "CC": (3,),
                                 "ED": (4,)}
    assert [s.num_classes for s in LABEL_SETS.values()] == [4, 4, 5, 5]
    assert extends("brats2024_gli", "brats2023") and not extends("brats2024_ped", "brats2023")
    for ls in LABEL_SETS.values():  # release values -> internal -> classes -> internal -> release values
        values = np.array(ls.values, np.uint8)
        internal = to_internal(values, ls)
        assert sorted(internal.tolist()) == list(ls.classes)
        classes = labels_to_classes(internal, ls.classes)
        assert sorted(classes.tolist()) == list(range(ls.num_classes))
        np.testing.assert_array_equal(to_dataset(classes_to_labels(classes, ls.classes), ls), values)


def test_internal_regions_score_as_the_release_regions():
    """Metrics of internal maps over a set's internal regions equal masks taken on the release's own values."""
    rng = np.random.default_rng(0)
    for ls in LABEL_SETS.values():
        pred, target = (rng.choice(ls.values, size=(8, 9, 10)).astype(np.uint8) for _ in range(2))
        ours = brats_metrics(to_internal(pred, ls), to_internal(target, ls), regions=ls.internal_regions)
        assert list(ours) == list(ls.regions)
        for region, values in ls.regions.items():
            p, t = np.isin(pred, values), np.isin(target, values)
            assert ours[region]["dice"] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))


def test_discovery_finds_every_task_and_picks_its_set(tmp_path):
    for name in CASES:
        for i, sid in enumerate(CASES[name]):
            write_subject(tmp_path, sid, None, seed=i)
    found = {s.subject_id: s.label_set for s in discover(tmp_path, require_labels=False)}
    assert set(found) == {sid for ids in CASES.values() for sid in ids}
    # auto: names decide; GLI names stay brats2023 (no guess of the resection cavity).
    want = {"BraTS20": "brats2021", "BraTS-PED": "brats2024_ped", "BraTS-": "brats2023"}
    assert all(found[sid] == next(v for k, v in want.items() if sid.startswith(k)) for sid in found)
    explicit = discover(tmp_path, require_labels=False, label_set="brats2024_gli")
    assert {s.label_set for s in explicit} == {"brats2024_gli"}
    preferred = {s.subject_id: s.label_set for s in discover(tmp_path, require_labels=False, prefer="brats2024_gli")}
    assert preferred["BraTS-GLI-00000-000"] == "brats2024_gli" and preferred["BraTS-PED-00010-000"] == "brats2024_ped"
    with pytest.raises(CMFLError, match=r"config\.data\.label_set: unknown label set 'brats2022'"):
        discover(tmp_path, label_set="brats2022")


def test_a_label_map_outside_the_set_names_the_file_and_values(tmp_path):
    write_set(tmp_path, "brats2024_gli")
    (subject, _) = discover(tmp_path)  # auto: brats2023, which has no 4
    with pytest.raises(CMFLError) as e:
        load_subject(subject)
    assert str(e.value) == (f"{subject.label}: label values [4] outside brats2023 (0/1/2/3); they fit "
                            "brats2024_gli, brats2024_ped: set config.data.label_set")
    (subject, _) = discover(tmp_path, label_set="brats2024_gli")
    np.testing.assert_array_equal(load_subject(subject).label, internal_truth("brats2024_gli"))
    (ped, _) = discover(tmp_path, label_set="brats2024_ped")  # values fit PED's (another meaning): no error
    with pytest.raises(CMFLError, match=r"label values \[7\] outside brats2024_ped \(0/1/2/3/4\)$"):
        label = to_dataset(internal_truth("brats2024_ped"), "brats2024_ped")
        label[0, 0, 0] = 7
        write_nifti(ped.label, label, np.diag([-1.0, -1.0, 1.0, 1.0]))
        load_subject(ped)


def test_a_ped_label_map_reads_as_its_tissues_and_a_csv_keeps_its_set(tmp_path):
    write_set(tmp_path, "brats2024_ped")
    subjects = discover(tmp_path)
    assert subjects[0].label_set == "brats2024_ped" and subjects[0].et_label == 1
    raw, loaded = read_nifti(subjects[0].label)[0], load_subject(subjects[0]).label
    for value, tissue in {1: 4, 2: 1, 3: 3, 4: 2}.items():  # ET, NET, CC, ED
        np.testing.assert_array_equal(loaded == tissue, raw == value)
    write_subject_csv(str(tmp_path / "s.csv"), subjects)
    assert [s.label_set for s in read_subject_csv(str(tmp_path / "s.csv"), True)] == ["brats2024_ped"] * 2


def test_targets_and_heads_follow_the_set():
    gli = LABEL_SETS["brats2024_gli"]
    target = label_targets(jnp.asarray(internal_truth(gli.name)), "classes", gli.classes)
    assert target.shape == (*TINY_SHAPE, 5) and float(target[4, 4, 4, 4]) == 1.0  # RC is class 4
    assert check_output_classes("regions", LABEL_SETS["brats2023"].classes) == "regions"
    with pytest.raises(CMFLError, match=r"config\.model\.output: 'regions' .* not brats2024_gli"):
        check_output_classes("regions", LABEL_SETS["brats2024_gli"].classes, "brats2024_gli")


class TruthPredictor(VolumePredictor):
    """A perfect model: one-hot probabilities of the truth (what follows is predict's: argmax, brain, values)."""

    def __init__(self, name: str, source: str):
        self.label_set, self.source, self.normalization = LABEL_SETS[name], source, "zscore_brain"

    def probabilities(self, image, *args, **kwargs):
        truth = internal_truth(self.label_set.name)
        return np.eye(self.label_set.num_classes, dtype=np.float32)[labels_to_classes(truth, self.label_set.classes)]


@pytest.mark.parametrize("name", list(CASES))
def test_prepare_predict_evaluate_round_trip(tmp_path, monkeypatch, name):
    """prepare caches the set's tissues; predict writes the release's own values (the label files themselves, for
    a perfect model) and evaluate scores every region of the set with Dice 1."""
    ids = write_set(tmp_path / "data", name)
    config = load_config("prepare")
    config.data.root = str(tmp_path / "data")
    config.data.label_set = name if name == "brats2024_gli" else "auto"  # GLI 2024 is never guessed from names
    rows = prepare.run(config, str(tmp_path / "prepare"))
    total = next(r for r in rows if r["layout"] == "all")
    assert total["subjects"] == len(ids) and (("mean voxels RC" in total) == (name == "brats2024_gli"))
    assert ("mean voxels CC" in total) == (name == "brats2024_ped")

    (tmp_path / "model").mkdir()
    monkeypatch.setattr(predict, "_load_predictor", lambda config, dirs: TruthPredictor(name, str(tmp_path / "model")))
    monkeypatch.setattr(predict, "_tuned_et_threshold", lambda *a: None)
    config = load_config("predict")
    config.model_dir, config.data.root = str(tmp_path / "model"), str(tmp_path / "data")
    config.postprocess.et_min_mm3 = 0.0
    predict.run(config, str(tmp_path / "predict"))  # auto: a brats2024_gli model claims the GLI names
    for subject in discover(tmp_path / "data", label_set=name):
        written, _, _ = read_nifti(str(tmp_path / "predict" / "predictions" / f"{subject.subject_id}.nii.gz"))
        np.testing.assert_array_equal(written, read_nifti(subject.label)[0])  # what the scorer reads: the release's

    config = load_config("evaluate")
    config.data.root, config.predictions = str(tmp_path / "data"), str(tmp_path / "predict" / "predictions")
    config.data.label_set = name
    evaluate.run(config, str(tmp_path / "evaluate"))
    summary = (tmp_path / "evaluate" / "evaluation_summary.csv").read_text().splitlines()
    header, mean = summary[0].split(","), dict(zip(summary[0].split(","), summary[1].split(","), strict=True))
    assert [c[5:] for c in header if c.startswith("dice_") and c != "dice_average"] == list(LABEL_SETS[name].regions)
    assert all(float(mean[f"dice_{r}"]) == 1.0 for r in LABEL_SETS[name].regions)


def test_a_model_of_other_classes_is_refused(tmp_path, monkeypatch):
    write_set(tmp_path / "data", "brats2024_ped")
    (tmp_path / "model").mkdir()
    monkeypatch.setattr(predict, "_load_predictor", lambda c, d: TruthPredictor("brats2024_gli", str(tmp_path)))
    monkeypatch.setattr(predict, "_tuned_et_threshold", lambda *a: None)
    config = load_config("predict")
    config.model_dir, config.data.root = str(tmp_path / "model"), str(tmp_path / "data")
    with pytest.raises(CMFLError, match="subject BraTS-PED-00010-000 is brats2024_ped, but the model predicts the "
                                        "classes of brats2024_gli"):
        predict.run(config, str(tmp_path / "predict"))


@pytest.mark.slow
def test_prepare_cli_one_line_error_for_rc_without_the_2024_set(tmp_path):
    write_set(tmp_path / "data", "brats2024_gli")
    r = run_cli("--config=configs/prepare.py", f"--workdir={tmp_path / 'w'}", f"--config.data.root={tmp_path / 'data'}",
                cache=tmp_path / "cache")
    label = tmp_path / "data" / CASES["brats2024_gli"][0] / f"{CASES['brats2024_gli'][0]}-seg.nii.gz"
    assert_one_line_error(r, str(label), "label values [4] outside brats2023 (0/1/2/3); they fit brats2024_gli")


@pytest.mark.slow
def test_cmff_trains_five_classes_and_predicts_the_resection_cavity(tmp_path):
    from cmfl_jax.jobs.cmff import train as train_cmff

    from .test_cmff_train import tiny_cmff_config

    ids = [*write_set(tmp_path / "data", "brats2024_gli"), "BraTS-GLI-02002-102"]  # 3 folds: 2 train, 1 validates
    write_subject(tmp_path / "data", ids[-1], to_dataset(internal_truth("brats2024_gli"), "brats2024_gli"), seed=5)
    workdir = tmp_path / "cmff"
    config = tiny_cmff_config(tmp_path / "data", steps=2, **{"init.mode": "random", "val.every": 2,
                                                              "data.label_set": "brats2024_gli"})
    runtime.write_config(config, str(workdir))  # as the CLI leaves it before the job
    states = train_cmff(config, str(workdir))
    head = jax.device_get(states["seg"].params)["S_F"]["head"]
    assert jax.tree.leaves(head)[-1].shape[-1] == 5  # background, NETC, SNFH, ET, RC
    assert json.loads((workdir / "config.json").read_text())["model"]["label_set"] == "brats2024_gli"
    assert "dice_RC" in checkpoints.latest_meta(str(workdir), "final")["val"]  # validation scores RC

    config = load_config("predict")
    config.model_dir, config.checkpoint, config.data.root = str(workdir), "final", str(tmp_path / "data")
    predict.run(config, str(tmp_path / "predict"))  # auto on GLI names: the model's brats2024_gli
    for sid in ids:
        written, _, _ = read_nifti(str(tmp_path / "predict" / "predictions" / f"{sid}.nii.gz"))
        assert set(np.unique(written).tolist()) <= {0, 1, 2, 3, 4}
    config = load_config("evaluate")
    config.data.root, config.predictions = str(tmp_path / "data"), str(tmp_path / "predict" / "predictions")
    config.data.label_set = "brats2024_gli"
    evaluate.run(config, str(tmp_path / "evaluate"))
    assert "dice_RC" in (tmp_path / "evaluate" / "evaluation_summary.csv").read_text().splitlines()[0]
