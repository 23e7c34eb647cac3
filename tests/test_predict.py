"""Prediction job: a CMFF workdir -> one NIfTI per subject, in the input's geometry and label convention; one case
from four files; a re-run resumes (skips what is done and up to date)."""

from __future__ import annotations

import json
import logging
import os

import jax
import nibabel as nib
import numpy as np
import pytest

from cmfl_jax.config_variants import load_config
from cmfl_jax.data.io import load_subject
from cmfl_jax.data.layouts import discover
from cmfl_jax.data.preprocess import preprocess_images
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.predictor import load_workdir
from cmfl_jax.inference.sliding_window import restrict_to_brain, sliding_window
from cmfl_jax.inference.stablehlo import VolumePredictor
from cmfl_jax.jobs.cmff import train as train_cmff
from cmfl_jax.jobs.predict import case_subject, run
from cmfl_jax.label_classes import classes_to_labels

from .conftest import write_tiny_dataset
from .test_cli import run_cli
from .test_cmff_train import tiny_cmff_config


@pytest.fixture(scope="module")
def cmff_workdir(tmp_path_factory):
    """A CMFF run of 2 steps on tiny data, as configs/cmff.py leaves it (config.json written by main)."""
    root = tmp_path_factory.mktemp("predict_train_data")
    write_tiny_dataset(root, n=3)
    workdir = tmp_path_factory.mktemp("cmff_run")
    config = tiny_cmff_config(root, steps=2, **{"init.mode": "random", "val.every": 2})
    states = train_cmff(config, str(workdir))
    (workdir / "config.json").write_text(config.to_json_best_effort())
    return workdir, jax.device_get(states["seg"].params)


def test_load_workdir_restores_the_trained_params(cmff_workdir):
    workdir, params = cmff_workdir
    predictor = load_workdir(str(workdir), "final")
    for a, b in zip(jax.tree.leaves(predictor.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert predictor.window == (16, 16, 16) and predictor.source.endswith(os.path.join("final", "2"))


@pytest.mark.parametrize("layout, et_label", [("brats2018", 4), ("brats2023", 3)])
def test_predictions_keep_geometry_and_label_convention(tmp_path, cmff_workdir, layout, et_label):
    workdir, _ = cmff_workdir
    write_tiny_dataset(tmp_path / "data", n=2, layout=layout)
    config = load_config("predict")
    config.model_dir, config.checkpoint = str(workdir), "final"
    config.data.root = str(tmp_path / "data")
    config.save_probabilities = True
    config.overlays = True
    config.postprocess.et_min_mm3 = 0.0  # the network's own labels (post-processing: test_postprocessing_...)
    run(config, str(tmp_path / "out"))
    overlays = sorted(os.listdir(tmp_path / "out" / "overlays"))
    assert overlays == sorted(f"{s.subject_id}.png" for s in discover(str(tmp_path / "data"), False))
    predictor = load_workdir(str(workdir), "final")
    for subject in discover(str(tmp_path / "data"), require_labels=False):
        path = tmp_path / "out" / "predictions" / f"{subject.subject_id}.nii.gz"
        img, source = nib.load(path), nib.load(subject.images[0])
        assert img.shape == source.shape and img.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(img.affine, source.affine)
        assert img.header.get_zooms() == source.header.get_zooms()
        written = np.asarray(img.dataobj)
        assert set(np.unique(written)) <= {0, 1, 2, et_label}
        # equal to a direct computation with the same params
        loaded = load_subject(subject, with_label=False)
        image = np.moveaxis(preprocess_images(loaded.images), 0, -1)
        probs = sliding_window(lambda x: np.asarray(predictor.model.apply({"params": predictor.params},
                                                                          x[..., :2], x[..., 2:])["probs"]),
                               image, (16, 16, 16))
        want = restrict_to_brain(classes_to_labels(probs.argmax(-1)), image)
        want = np.where(want == 4, et_label, want)
        np.testing.assert_array_equal(written, want)
        saved_probs = np.asarray(nib.load(str(path).replace(".nii.gz", "_probabilities.nii.gz")).dataobj)
        np.testing.assert_allclose(saved_probs, probs, rtol=1e-5, atol=1e-6)
    assert not [f for f in os.listdir(tmp_path / "out" / "predictions") if f.startswith(".tmp")]


def test_a_workdir_that_is_not_a_cmff_run_is_a_clear_error(tmp_path, cmff_workdir):
    with pytest.raises(CMFLError, match="does not exist"):
        load_workdir(str(tmp_path / "nothing"))
    (tmp_path / "cmft").mkdir()
    (tmp_path / "cmft" / "config.json").write_text('{"job": "cmft"}')
    with pytest.raises(CMFLError, match=r"config.json: this is a 'cmft' run, not a CMFF run"):
        load_workdir(str(tmp_path / "cmft"))
    workdir, _ = cmff_workdir
    with pytest.raises(CMFLError, match=r"config\.checkpoint: unknown value 'newest'"):
        load_workdir(str(workdir), "newest")


def test_predict_cli_without_a_model_dir_is_one_line(tmp_path):
    r = run_cli("--config=configs/predict.py", f"--workdir={tmp_path / 'w'}", cache=tmp_path / "cache")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "cmfl_jax: error: config.model_dir: is empty: give the workdir of a CMFF run (configs/cmff.py) or a bundle "
        "(configs/export.py)"]


def test_bundle_round_trip_and_stablehlo_equal_the_model(tmp_path, cmff_workdir):
    from cmfl_jax.inference.bundle import export_bundle, stablehlo_name
    from cmfl_jax.inference.predictor import load_bundle
    from cmfl_jax.inference.stablehlo import load_exported

    workdir, _ = cmff_workdir
    bundle = export_bundle(str(workdir), str(tmp_path / "bundle"), "best")
    assert sorted(os.listdir(bundle)) == ["bundle.json", "params", stablehlo_name((16, 16, 16))]
    from_workdir, from_bundle = load_workdir(str(workdir), "best"), load_bundle(bundle)
    image = np.random.default_rng(0).normal(size=(20, 22, 24, 4)).astype(np.float32)
    np.testing.assert_array_equal(from_bundle.probabilities(image), from_workdir.probabilities(image))
    window = image[None, :16, :16, :16]
    direct = from_workdir.model.apply({"params": from_workdir.params}, window[..., :2], window[..., 2:])["probs"]
    serialized = load_exported(os.path.join(bundle, stablehlo_name((16, 16, 16)))).call
    np.testing.assert_allclose(np.asarray(serialized(window)), np.asarray(direct), rtol=1e-5, atol=1e-6)
    # predict takes the bundle as its model_dir
    write_tiny_dataset(tmp_path / "data", n=1)
    config = load_config("predict")
    config.model_dir, config.data.root = bundle, str(tmp_path / "data")
    run(config, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out" / "predictions") == ["Brats18_SYN_0000_1.nii.gz"]


def test_one_case_from_four_files(tmp_path, cmff_workdir):
    workdir, _ = cmff_workdir
    (subject,) = write_tiny_dataset(tmp_path / "data", n=1)
    config = load_config("predict")
    config.model_dir, config.checkpoint = str(workdir), "final"
    config.case, config.case_id, config.et_label = ",".join(subject.images), "patient7", 3
    config.postprocess.et_min_mm3 = 0.0  # the network's own labels
    run(config, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out" / "predictions") == ["patient7.nii.gz"]
    written = np.asarray(nib.load(tmp_path / "out" / "predictions" / "patient7.nii.gz").dataobj)
    predictor = load_workdir(str(workdir), "final")
    want, _ = predictor.labels(predictor.model_input(load_subject(subject, with_label=False)))
    np.testing.assert_array_equal(written, np.where(want == 4, 3, want))
    # the default id is the T1 file's name without extension and modality suffix
    case = case_subject(",".join(subject.images))
    assert (case.subject_id, case.layout, case.label, case.et_label) == ("Brats18_SYN_0000_1", "case", None, 4)
    assert case.images == subject.images


def test_a_folder_of_symlinked_subject_folders_predicts(tmp_path, cmff_workdir):
    """A split made of links (``ln -s``) to subject folders elsewhere: every linked subject is predicted."""
    workdir, _ = cmff_workdir
    subjects = write_tiny_dataset(tmp_path / "data", n=3)
    (tmp_path / "split").mkdir()
    for subject in subjects[:2]:
        os.symlink(subject.folder, tmp_path / "split" / os.path.basename(subject.folder))
    config = load_config("predict")
    config.model_dir, config.checkpoint, config.data.root = str(workdir), "final", str(tmp_path / "split")
    run(config, str(tmp_path / "out"))
    written = sorted(os.listdir(tmp_path / "out" / "predictions"))
    assert written == sorted(f"{s.subject_id}.nii.gz" for s in subjects[:2])


def test_a_wrong_case_is_one_line(tmp_path):
    files = [str(tmp_path / f"{m}.nii.gz") for m in ("t1", "t1ce", "t2", "flair")]
    for f in files[1:]:
        open(f, "w").close()
    with pytest.raises(CMFLError, match=rf"^{files[0]}: file not found \(config.case\)$"):
        case_subject(",".join(files))
    r = run_cli("--config=configs/predict.py", f"--workdir={tmp_path / 'w'}", "--config.model_dir=/nowhere",
                f"--config.case={','.join(files[1:])}", cache=tmp_path / "cache")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "cmfl_jax: error: config.case: expected 4 comma-separated files (t1,t1ce,t2,flair), got 3"]


def test_a_rerun_predicts_only_what_is_missing_or_stale(tmp_path, cmff_workdir, monkeypatch, caplog):
    workdir, _ = cmff_workdir
    subjects = write_tiny_dataset(tmp_path / "data", n=3)
    config = load_config("predict")
    config.model_dir, config.checkpoint = str(workdir), "final"
    config.data.root, config.save_probabilities = str(tmp_path / "data"), True
    out = tmp_path / "out" / "predictions"
    predicted = []
    labels = VolumePredictor.labels
    monkeypatch.setattr(VolumePredictor, "labels", lambda self, *a: predicted.append(1) or labels(self, *a))
    caplog.set_level(logging.INFO, logger="absl")

    def rerun(**overrides):
        predicted.clear()
        caplog.clear()
        config.update(overrides)
        run(config, str(tmp_path / "out"))
        mtimes = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
        return len(predicted), mtimes

    calls, first = rerun()
    assert calls == 3 and len(first) == 6
    ids = [s.subject_id for s in subjects]
    os.remove(out / f"{ids[1]}.nii.gz")  # a run stopped between the two files of a subject
    calls, second = rerun()
    assert calls == 1 and "predict: skipped 2 of 3 subject(s) already predicted" in caplog.text
    assert {f: t for f, t in second.items() if ids[1] not in f} == {f: t for f, t in first.items() if ids[1] not in f}
    assert second[f"{ids[1]}.nii.gz"] > first[f"{ids[0]}.nii.gz"]  # rewritten
    os.utime(out / f"{ids[2]}_probabilities.nii.gz", (1, 1))  # older than the model: stale
    calls, third = rerun()
    assert calls == 1 and third[f"{ids[2]}_probabilities.nii.gz"] > second[f"{ids[1]}.nii.gz"]
    calls, fourth = rerun(overwrite=True)
    assert calls == 3 and all(fourth[f] > third[f] for f in third) and "predict: skipped" not in caplog.text
    config.overwrite = False
    # A changed setting or model redoes every subject, even though the files are newer than the model.
    before = fourth
    for change in ({"mirror": True}, {"window": "16,16,16"}, {"checkpoint": "best"}):
        calls, after = rerun(**change)
        assert calls == 3 and all(after[f] > before[f] for f in before), change
        before = after
    config.postprocess.et_min_mm3 = 123.0  # not the tuned value
    calls, after = rerun()
    assert calls == 3 and all(after[f] > before[f] for f in before)
    calls, _ = rerun()  # nothing changed since: nothing redone
    assert calls == 0
    record = json.loads((tmp_path / "out" / "predictions_record.json").read_text())
    assert sorted(record) == sorted(ids) and record[ids[0]]["mirror"] is True and record[ids[0]]["et_min_mm3"] == 123


def test_the_tuned_postprocessing_travels_into_the_bundle_and_prediction_applies_it(tmp_path, cmff_workdir,
                                                                                   monkeypatch):
    """Validation tunes the ET threshold (best/ and final/ meta), export copies it into bundle.json, and predict
    applies it unless told otherwise: a hand-made prediction with a 20-voxel ET speck loses it."""
    from cmfl_jax import checkpoints
    from cmfl_jax.inference.bundle import export_bundle
    from cmfl_jax.postprocess import ET_GRID_MM3

    workdir, _ = cmff_workdir
    meta = checkpoints.latest_meta(str(workdir), "best")
    assert meta["postprocess"]["et_min_mm3"] in ET_GRID_MM3 and meta["postprocess"]["subjects"] == 1
    assert checkpoints.latest_meta(str(workdir), "final")["postprocess"]["et_min_mm3"] in ET_GRID_MM3
    bundle = export_bundle(str(workdir), str(tmp_path / "bundle"), "best")
    info = json.loads(open(os.path.join(bundle, "bundle.json")).read())
    assert info["postprocess"] == meta["postprocess"]

    speck = np.zeros((20, 22, 24), np.uint8)
    speck[6:14, 6:14, 6:14] = 2
    speck[9:11, 9:11, 8:13] = 4  # 20 voxels of 1 mm³
    monkeypatch.setattr(VolumePredictor, "labels", lambda self, image, *a: (speck, np.zeros((*speck.shape, 4))))
    write_tiny_dataset(tmp_path / "data", n=1)

    def et_voxels(et_min_mm3: float, tuned: float | None) -> int:
        info["postprocess"] = {} if tuned is None else {"et_min_mm3": tuned}
        with open(os.path.join(bundle, "bundle.json"), "w") as f:
            json.dump(info, f)
        config = load_config("predict")
        config.model_dir, config.data.root, config.overwrite = bundle, str(tmp_path / "data"), True
        config.postprocess.et_min_mm3 = et_min_mm3
        run(config, str(tmp_path / "out"))
        return int(np.count_nonzero(nib.load(tmp_path / "out" / "predictions" / "Brats18_SYN_0000_1.nii.gz")
                                    .get_fdata() == 4))

    assert et_voxels(-1.0, tuned=30.0) == 0  # the tuned 30 mm³ removes 20 mm³ of ET
    assert et_voxels(-1.0, tuned=10.0) == 20  # a tuned 10 mm³ keeps it
    assert et_voxels(-1.0, tuned=None) == 0  # no tuned value: the default 500 mm³
    assert et_voxels(0.0, tuned=30.0) == 20  # switched off


def test_tumour_centre_is_the_centre_of_mass():
    from cmfl_jax.previews import tumour_centre

    mask = np.zeros((10, 12, 14), bool)
    mask[2:5, 6:9, 10:14] = True
    assert tumour_centre(mask, mask.shape) == (3, 7, 12)  # 11.5 rounds to the even 12
    assert tumour_centre(np.zeros_like(mask), mask.shape) == (5, 6, 7)


def test_choose_window():
    from cmfl_jax.inference.sliding_window import choose_window

    assert choose_window("", (16, 16, 16), (20, 22, 24), 4) == (16, 16, 16)
    assert choose_window("whole", (16, 16, 16), (20, 22, 24), 4) == (20, 24, 24)
    assert choose_window("whole", (16, 16, 16), (240, 240, 155), 16) == (240, 240, 160)
    assert choose_window("32,16,48", (16, 16, 16), (20, 22, 24), 16) == (32, 16, 48)
    for bad in ("30,32,32", "32,32", "big", "0,16,16"):
        with pytest.raises(CMFLError, match=r"config\.window: must be") as e:
            choose_window(bad, (16, 16, 16), (20, 22, 24), 16)
        assert bad in str(e.value)


def test_whole_volume_window_is_one_network_call(tmp_path, cmff_workdir):
    """--config.window=whole: the probabilities are the network's on the volume zero-padded (centred) to a multiple
    of 2^depth, in one call, cropped back; computed here directly from the Flax model."""
    workdir, _ = cmff_workdir
    (subject,) = write_tiny_dataset(tmp_path / "data", n=1)
    config = load_config("predict")
    config.model_dir, config.checkpoint = str(workdir), "final"
    config.data.root = str(tmp_path / "data")
    config.window, config.save_probabilities, config.postprocess.et_min_mm3 = "whole", True, 0.0
    run(config, str(tmp_path / "out"))
    written = np.asarray(nib.load(tmp_path / "out" / "predictions" / f"{subject.subject_id}_probabilities.nii.gz")
                         .dataobj)
    predictor = load_workdir(str(workdir), "final")
    image = predictor.model_input(load_subject(subject, with_label=False))
    m = predictor.multiple
    edges = [-(-s // m) * m for s in image.shape[:3]]
    before = [(e - s) // 2 for e, s in zip(edges, image.shape[:3], strict=True)]
    padded = np.pad(image, [(b, e - s - b) for b, e, s in zip(before, edges, image.shape[:3], strict=True)] + [(0, 0)])
    a, b = padded[None, ..., :2], padded[None, ..., 2:]  # pairs (T1, T1c) and (T2, FLAIR)
    probs = np.asarray(predictor.model.apply({"params": predictor.params}, a, b)["probs"])[0]
    window = tuple(slice(o, o + s) for o, s in zip(before, image.shape[:3], strict=True))
    np.testing.assert_allclose(written, probs[window], rtol=1e-5, atol=1e-6)
    assert tuple(edges) != predictor.window  # not the training patch's tiling
    with pytest.raises(CMFLError, match=r"config\.window"):
        config.window, config.overwrite = "7,7,7", True
        run(config, str(tmp_path / "out2"))
