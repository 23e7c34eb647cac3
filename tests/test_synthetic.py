"""The built-in synthetic data set: shapes, determinism, contrasts, tumour sizes and the written trees."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from cmfl_jax import synthetic
from cmfl_jax.data.io import load_subject
from cmfl_jax.data.layouts import discover, subject_file_paths
from cmfl_jax.errors import CMFLError
from cmfl_jax.synthetic import montage

from .conftest import REPO

SMALL = (48, 48, 48)


@functools.cache
def subject(seed: int, shape=SMALL, lgg: bool | None = None) -> synthetic.Phantom:
    """Phantoms are deterministic, so tests share them (each costs ~0.1 s at 48^3, ~1.5 s at BraTS size)."""
    return synthetic.make_subject(seed, shape, lgg=lgg)


def normal_wm(ph: synthetic.Phantom) -> np.ndarray:
    """Normal white matter, approximately: the brightest quarter of the tumour-free brain on T1."""
    normal = (ph.images[0] > 0) & (ph.label == 0)
    return normal & (ph.images[0] > np.percentile(ph.images[0][normal], 75))


@pytest.mark.parametrize("seed", range(4))
def test_shapes_dtypes_labels_affine(seed):
    ph = subject(seed)
    assert ph.images.shape == (4, *SMALL) and ph.images.dtype == np.float32
    assert ph.label.shape == SMALL and ph.label.dtype == np.uint8
    assert set(np.unique(ph.label).tolist()) <= {0, 1, 2, 4}
    assert np.all(np.isfinite(ph.images))
    assert ph.affine.shape == (4, 4) and ph.affine.dtype == np.float64
    assert np.array_equal(ph.affine, [[-1, 0, 0, 0], [0, -1, 0, 47], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert ph.grade == synthetic.grade_of_seed(seed)
    assert all(0 <= c < s for c, s in zip(ph.centre, SMALL, strict=True))


def test_spacing_goes_into_the_affine():
    ph = synthetic.make_subject(1, (32, 40, 24), spacing=(1.5, 1.5, 2.0))
    assert ph.images.shape == (4, 32, 40, 24)
    assert np.array_equal(np.diag(ph.affine), [-1.5, -1.5, 2.0, 1.0]) and ph.affine[1, 3] == 39 * 1.5
    assert ph.spacing == (1.5, 1.5, 2.0)


def test_deterministic_given_the_seed():
    a = synthetic.make_subject(3, SMALL)
    b = synthetic.make_subject(3, SMALL)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.label, b.label)
    assert a.images.tobytes() == b.images.tobytes()  # bit-equal, not just close
    c = subject(4)
    assert not np.array_equal(a.images, c.images) and not np.array_equal(a.label, c.label)


@pytest.mark.parametrize("seed", range(4))
def test_background_is_exactly_zero_brain_is_nonzero_in_every_modality(seed):
    ph = subject(seed)
    brain = ph.images[0] > 0
    for channel in ph.images:
        assert np.array_equal(channel > 0, brain)  # one brain mask for all modalities
        assert np.all(channel[~brain] == 0.0) and np.all(channel >= 0)
    assert 0.08 < brain.mean() < 0.4  # a brain, not an empty grid or a filled one
    assert not brain[0].any() or not brain[-1].any()  # the brain does not fill the field of view


@pytest.mark.parametrize("seed", range(6))
def test_tumour_inside_the_brain(seed):
    ph = subject(seed)
    tumour = ph.label > 0
    assert tumour.any()
    assert np.all(ph.images[:, tumour] > 0)
    assert ph.label[ph.centre] in (1, 4)  # the centre is tumour core


@pytest.mark.parametrize("seed", range(5))
def test_grades_lgg_has_no_enhancing_hgg_has_all_classes(seed):
    hgg, lgg = subject(seed, lgg=False), subject(seed, lgg=True)
    assert hgg.grade == "HGG" and lgg.grade == "LGG"
    assert {1, 2, 4} <= set(np.unique(hgg.label).tolist())
    assert set(np.unique(lgg.label).tolist()) == {0, 1, 2}


def test_seed_decides_about_a_quarter_lgg():
    grades = [synthetic.grade_of_seed(s) for s in range(400)]
    assert 0.18 < grades.count("LGG") / len(grades) < 0.32
    assert subject(8).grade == synthetic.grade_of_seed(8)


def test_lgg_fraction_sets_the_share_and_keeps_the_draw():
    """The grade is the same uniform draw per seed compared with another threshold: 0 and 1 give all HGG / all LGG,
    and a subject LGG at 0.25 stays LGG at 0.5 (the default data set's LGG subjects are in the new one)."""
    draws = [synthetic.grade_of_seed(s, 0.5) for s in range(400)]
    assert 0.42 < draws.count("LGG") / len(draws) < 0.58
    assert {synthetic.grade_of_seed(s, 0.0) for s in range(50)} == {"HGG"}
    assert {synthetic.grade_of_seed(s, 1.0) for s in range(50)} == {"LGG"}
    assert all(synthetic.grade_of_seed(s, 0.5) == "LGG" for s in range(400) if synthetic.grade_of_seed(s) == "LGG")
    with pytest.raises(CMFLError, match="lgg_fraction"):
        synthetic.write_dataset("/nonexistent", 1, lgg_fraction=1.5)


@pytest.mark.parametrize("seed", range(3))
def test_contrasts_need_several_modalities(seed):
    ph = subject(seed, (64, 64, 64), lgg=False)
    t1, t1c, t2, flair = ph.images
    et, ed, ncr, wm = ph.label == 4, ph.label == 2, ph.label == 1, normal_wm(ph)
    # Enhancement is seen on T1c only.
    assert t1c[et].mean() > 1.25 * t1c[ed].mean() and t1c[et].mean() > 1.25 * t1c[wm].mean()
    assert t1[et].mean() < t1[wm].mean()
    # Oedema is bright on T2 and FLAIR, and only a faint shadow on T1c.
    assert t2[ed].mean() > 1.3 * t2[wm].mean() and flair[ed].mean() > 1.3 * flair[wm].mean()
    assert 0.85 < t1c[ed].mean() / t1c[wm].mean() < 1.15
    # FLAIR suppresses fluid: necrosis is bright on T2 but less so on FLAIR; T1 is dark there.
    assert t2[ncr].mean() / t2[wm].mean() > flair[ncr].mean() / flair[wm].mean()
    assert t1[ncr].mean() < 0.7 * t1[wm].mean()
    # Necrosis and oedema overlap on T2 (not separable by one threshold).
    assert np.percentile(t2[ncr], 10) < np.percentile(t2[ed], 90)


@pytest.mark.slow
def test_whole_tumour_volume_at_brats_size():
    """20-200 cm^3 whole tumour at 240x240x155, 1 mm; enhancing tumour in HGG only."""
    for seed in (0, 8):  # the seeds make one HGG and one LGG-like subject
        ph = synthetic.make_subject(seed, synthetic.BRATS_SHAPE)  # not cached: 150 MB each
        assert ph.images.shape == (4, 240, 240, 155)
        wt_cm3 = np.count_nonzero(ph.label) / 1000.0
        assert 20.0 <= wt_cm3 <= 200.0, (seed, wt_cm3)
        brain_cm3 = np.count_nonzero(ph.images[0]) / 1000.0
        assert 1000.0 < brain_cm3 < 1800.0, brain_cm3
        assert (np.count_nonzero(ph.label == 4) > 0) == (ph.grade == "HGG") == (seed == 0)


@pytest.mark.parametrize("shape", [(64, 64, 64), (32, 32, 32)])
def test_tumour_keeps_its_share_of_the_brain_on_small_grids(shape):
    """The same range scaled: 20-200 cm^3 of a 1200-1600 cm^3 brain is about 1.2-17 %."""
    for seed in range(6):
        ph = subject(seed, shape)
        share = np.count_nonzero(ph.label) / np.count_nonzero(ph.images[0])
        assert 0.012 < share < 0.17, (seed, share)


def test_bad_arguments_raise_cmfl_error():
    with pytest.raises(CMFLError, match="seed"):
        synthetic.make_subject(-1, SMALL)
    with pytest.raises(CMFLError, match="shape"):
        synthetic.make_subject(0, (8, 8, 8))
    with pytest.raises(CMFLError, match="spacing"):
        synthetic.make_subject(0, SMALL, spacing=(1, 0, 1))
    with pytest.raises(CMFLError, match="layout"):
        synthetic.write_dataset("/nonexistent", 1, layout="brats1999", shape=SMALL)


def _mixed_grade_seed(n: int) -> int:
    """A data-set seed whose first n subjects include both grades."""
    grades = lambda s: {synthetic.grade_of_seed(synthetic.subject_seed(s, i)) for i in range(n)}
    return next(s for s in range(100) if len(grades(s)) == 2)


@pytest.mark.parametrize("layout", ["brats2018", "brats2021", "brats2023"])
def test_write_dataset_layouts_read_back(tmp_path, layout):
    n, shape = 3, (32, 32, 32)
    seed = _mixed_grade_seed(n)
    subjects = synthetic.write_dataset(tmp_path, n, layout=layout, shape=shape, seed=seed, progress=False)
    assert len(subjects) == n
    for i, s in enumerate(subjects):
        ph = synthetic.make_subject(synthetic.subject_seed(seed, i), shape)
        assert s == subject_file_paths(tmp_path, layout, i, ph.grade)
        if layout == "brats2018":
            assert os.path.basename(os.path.dirname(s.folder)) == ph.grade  # HGG/ and LGG/ subfolders
        for path, volume in zip(s.images, ph.images, strict=True):
            img = nib.load(path)
            assert img.get_data_dtype() == np.float32
            assert np.array_equal(np.asanyarray(img.dataobj), volume)
            assert np.array_equal(img.affine, ph.affine)
            assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        seg = nib.load(s.label)
        assert seg.get_data_dtype() == np.uint8 and np.array_equal(seg.affine, ph.affine)
        stored = np.asanyarray(seg.dataobj)
        expected = ph.label.copy()
        if layout == "brats2023":
            expected[ph.label == 4] = 3  # BraTS 2023: enhancing tumour is label 3
            assert 4 not in stored
        assert np.array_equal(stored, expected)
    # Nothing temporary is left, and the project's own reader finds and accepts every subject.
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.startswith(".tmp")]
    found = discover(tmp_path)
    assert sorted(x.subject_id for x in found) == sorted(x.subject_id for x in subjects)
    grades = {x.grade for x in found}
    assert grades == ({"HGG", "LGG"} if layout == "brats2018" else {None})
    loaded = load_subject(found[0])
    assert set(np.unique(loaded.label).tolist()) <= {0, 1, 2, 4}


@pytest.mark.slow
def test_write_dataset_skips_complete_subjects(tmp_path):
    shape = (24, 24, 24)
    subjects = synthetic.write_dataset(tmp_path, 2, shape=shape, progress=False)
    stamps = {p: os.stat(p).st_mtime_ns for s in subjects for p in (*s.images, s.label)}
    os.remove(subjects[1].images[2])
    again = synthetic.write_dataset(tmp_path, 2, shape=shape, progress=False)
    assert again == subjects
    assert all(os.stat(p).st_mtime_ns == stamps[p] for p in (*subjects[0].images, subjects[0].label))
    assert os.path.exists(subjects[1].images[2])  # the incomplete subject was written again
    # A different grid is not mistaken for a finished subject.
    synthetic.write_dataset(tmp_path, 1, shape=(20, 20, 20), progress=False)
    assert nib.load(subjects[0].label).shape == (20, 20, 20)


def test_write_dataset_spacing_in_header(tmp_path):
    (s,) = synthetic.write_dataset(tmp_path, 1, layout="brats2021", shape=(24, 24, 20), spacing=(2, 2, 3),
                                   progress=False)
    img = nib.load(s.images[0])
    assert img.header.get_zooms() == (2.0, 2.0, 3.0)
    assert np.array_equal(np.diag(img.affine), [-2.0, -2.0, 3.0, 1.0])


def run_cli(*args, module: str = "cmfl_jax.synthetic"):
    env = dict(os.environ, CI="true")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_writes_a_tree_and_rejects_bad_arguments_in_one_line(tmp_path):
    r = run_cli("--out", str(tmp_path / "d"), "--n", "2", "--shape", "24,24,24", "--layout", "brats2023")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "2 subjects in" in r.stdout
    assert [x.subject_id for x in discover(tmp_path / "d")] == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    for args in (["--n", "2"], ["--out", str(tmp_path), "--n", "0"], ["--out", str(tmp_path), "--n", "1",
                                                                     "--shape", "24,24"]):
        r = run_cli(*args)
        assert r.returncode == 2, r
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("cmfl_jax.synthetic: error: ")
    # The old command, python -m cmfl_jax.data.phantom, runs the same command line.
    r = run_cli("--out", str(tmp_path), "--n", "0", module="cmfl_jax.data.phantom")
    assert r.returncode == 2 and r.stderr.startswith("cmfl_jax.synthetic: error: n: "), r


def test_the_public_name_in_the_data_layer_is_the_synthetic_package():
    """``cmfl_jax.data.phantom.make_subject`` and ``write_dataset`` (the documented surface) stay importable."""
    from cmfl_jax.data import phantom

    for name in synthetic.__all__:
        assert getattr(phantom, name) is getattr(synthetic, name), name
    assert phantom.make_subject(3, SMALL).images.tobytes() == subject(3).images.tobytes()


def test_montage_draws_every_subject(tmp_path, capsys):
    out = tmp_path / "montage.png"
    montage.main(["--seeds", "0,1", "--lgg", "1", "--shape", "32,32,32", "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["seed 0", "seed 1", f"wrote {out}"]
    assert "seed 1: LGG" in lines[1] and "ET present: False" in lines[1]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
