"""Layout discovery from file names and label conventions."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from cmfl_jax.data import layouts
from cmfl_jax.data.layouts import MODALITIES, NamingFamily, discover, subject_file_paths, to_dataset, to_internal
from cmfl_jax.errors import CMFLError

from .conftest import write_tiny_dataset


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def make_release_tree(root, subject_ids, suffixes, sep="_", with_seg=True):
    for rel in subject_ids:
        folder = root / rel
        sid = folder.name
        for s in suffixes + (["seg"] if with_seg else []):
            touch(folder / f"{sid}{sep}{s}.nii.gz")


CLASSIC = ["t1", "t1ce", "t2", "flair"]


def test_brats2018_with_hgg_lgg(tmp_path):
    root = tmp_path / "MICCAI_BraTS_2018_Data_Training"
    make_release_tree(root, ["HGG/Brats18_2013_10_1", "HGG/Brats18_CBICA_AAB_1", "LGG/Brats18_2013_0_1"], CLASSIC)
    (root / "survival_data.csv").write_text("BraTS18ID,Age\n")  # release extras are ignored
    subjects = discover(root)
    assert [s.subject_id for s in subjects] == ["Brats18_2013_0_1", "Brats18_2013_10_1", "Brats18_CBICA_AAB_1"]
    assert [s.grade for s in subjects] == ["LGG", "HGG", "HGG"]
    assert {s.layout for s in subjects} == {"brats2018"}
    assert all(s.et_label == 4 for s in subjects)
    s = subjects[1]
    assert [p.rsplit("_", 1)[1] for p in s.images] == [f"{m}.nii.gz" for m in CLASSIC]
    assert s.label.endswith("Brats18_2013_10_1_seg.nii.gz")


def test_brats2020_and_2021(tmp_path):
    make_release_tree(tmp_path / "a", ["BraTS20_Training_001", "BraTS20_Training_002"], CLASSIC)
    make_release_tree(tmp_path / "b", ["BraTS2021_00000", "BraTS2021_00002"], CLASSIC)
    s20 = discover(tmp_path / "a")
    s21 = discover(tmp_path / "b")
    assert [s.subject_id for s in s20] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert [s.layout for s in s20] == ["brats2020"] * 2
    assert [s.layout for s in s21] == ["brats2021"] * 2
    assert all(s.grade is None and s.et_label == 4 for s in s20 + s21)


def test_brats2023_names_and_et3(tmp_path):
    make_release_tree(tmp_path, ["BraTS-GLI-00000-000", "BraTS-GLI-00002-001"], ["t1n", "t1c", "t2w", "t2f"], sep="-")
    subjects = discover(tmp_path)
    assert [s.subject_id for s in subjects] == ["BraTS-GLI-00000-000", "BraTS-GLI-00002-001"]
    s = subjects[0]
    assert s.layout == "brats2023" and s.et_label == 3
    # Internal channel order T1, T1c, T2, FLAIR maps to t1n, t1c, t2w, t2f.
    assert [p.rsplit("-", 1)[1] for p in s.images] == ["t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]


def test_unlabelled_validation_set(tmp_path):
    make_release_tree(tmp_path, ["BraTS20_Validation_001"], CLASSIC, with_seg=False)
    with pytest.raises(CMFLError, match="no label map"):
        discover(tmp_path)
    (s,) = discover(tmp_path, require_labels=False)
    assert s.label is None


@pytest.mark.parametrize("layout", ["brats2018", "brats2021", "brats2023"])
def test_trees_written_by_the_package_are_discovered(tmp_path, layout):
    written = write_tiny_dataset(tmp_path, n=3, layout=layout)
    found = discover(tmp_path)
    assert sorted(found, key=lambda s: s.subject_id) == sorted(written, key=lambda s: s.subject_id)


def test_missing_modality_names_folder_and_modality(tmp_path):
    make_release_tree(tmp_path, ["BraTS2021_00000"], ["t1", "t2", "flair"])
    with pytest.raises(CMFLError) as e:
        discover(tmp_path)
    assert str(tmp_path / "BraTS2021_00000") in str(e.value) and "missing modality t1ce" in str(e.value)


def test_empty_and_missing_root(tmp_path):
    with pytest.raises(CMFLError, match="no subjects found"):
        discover(tmp_path)
    with pytest.raises(CMFLError, match="does not exist"):
        discover(tmp_path / "nowhere")


def test_explicit_csv_layout(tmp_path):
    for name in ["a_T1.nii", "a_T1c.nii", "a_T2.nii", "a_FL.nii", "a_lab.nii"]:
        touch(tmp_path / "imgs" / name)
    csv = tmp_path / "list.csv"
    csv.write_text("subject_id,t1,t1ce,t2,flair,seg,et_label\ncase_a,imgs/a_T1.nii,imgs/a_T1c.nii,imgs/a_T2.nii,"
                   "imgs/a_FL.nii,imgs/a_lab.nii,3\n")
    (s,) = discover(csv)
    assert s.subject_id == "case_a" and s.layout == "csv" and s.et_label == 3
    assert s.images[1] == str(tmp_path / "imgs" / "a_T1c.nii")
    bad = tmp_path / "bad.csv"
    bad.write_text("subject_id,t1,t2,flair\nx,a,b,c\n")
    with pytest.raises(CMFLError, match="lacks column"):
        discover(bad)


def test_label_round_trip_2023():
    internal = np.array([0, 1, 2, 4, 4, 1], np.uint8)
    dataset = to_dataset(internal, 3)
    np.testing.assert_array_equal(dataset, [0, 1, 2, 3, 3, 1])
    np.testing.assert_array_equal(to_internal(dataset, 3), internal)
    np.testing.assert_array_equal(to_dataset(internal, 4), internal)
    assert MODALITIES == ("t1", "t1ce", "t2", "flair")


def test_folder_of_symlinks_to_subjects(tmp_path):
    """A split folder made of links to subject folders (kept elsewhere) is discovered through the links."""
    ids = ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    make_release_tree(tmp_path / "data", ids, CLASSIC)
    split = tmp_path / "split"
    split.mkdir()
    for sid in ids[:2]:
        os.symlink(tmp_path / "data" / sid, split / sid, target_is_directory=True)
    found = discover(split)
    originals = discover(tmp_path / "data")[:2]
    assert [s.subject_id for s in found] == ids[:2]
    assert [(s.layout, s.et_label, s.grade) for s in found] == [(s.layout, s.et_label, s.grade) for s in originals]
    for s, o in zip(found, originals, strict=True):
        assert all(p.startswith(str(split / s.subject_id) + os.sep) for p in (*s.images, s.label))
        assert [os.path.realpath(p) for p in s.images] == [os.path.realpath(p) for p in o.images]


def discover_within(root, seconds=60.0):
    """discover() in a thread, so that a walk that never ends fails the test instead of hanging it."""
    result = {}

    def run():
        try:
            result["value"] = discover(root)
        except Exception as e:  # re-raised below, in the test's own thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "discover did not finish: a link cycle is walked forever"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_link_cycle_ends_and_yields_each_subject_once(tmp_path):
    root = tmp_path / "data"
    make_release_tree(root, ["BraTS2021_00000", "sub/BraTS2021_00001"], CLASSIC)
    os.symlink(root, root / "BraTS2021_00000" / "loop", target_is_directory=True)  # link to an ancestor
    os.symlink(root / "sub", root / "sub" / "BraTS2021_00001" / "up", target_is_directory=True)
    found = discover_within(root)
    assert [s.subject_id for s in found] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert found[0].folder == str(root / "BraTS2021_00000")


def test_links_to_folders_already_in_the_tree_are_read_once(tmp_path):
    """Originals and a split folder of links to them under one root: each subject once, not "appears twice"."""
    root = tmp_path / "data"
    make_release_tree(root / "all", ["BraTS2021_00000", "BraTS2021_00001"], CLASSIC)
    (root / "train").mkdir()
    os.symlink(root / "all" / "BraTS2021_00001", root / "train" / "BraTS2021_00001", target_is_directory=True)
    found = discover_within(root)
    assert [s.folder for s in found] == [str(root / "all" / "BraTS2021_00000"), str(root / "all" / "BraTS2021_00001")]


XYZ = NamingFamily(
    name="xyz",
    suffixes={"t1": "a1", "t1ce": "a2", "t2": "a3", "flair": "a4", "seg": "lab"},
    sep="-",
    id_pattern=r"BraTS-XYZ-\d+-\d+",
    label_set="brats2023",
    releases=(("BraTS-XYZ-", "brats2025"),),
    default_release="xyz-named",
    writable=(("brats2025", "BraTS-XYZ-{index:05d}-000", False),),
)


def test_a_naming_family_is_one_table_entry(tmp_path, monkeypatch):
    ids = ["BraTS-XYZ-00001-000", "BraTS-XYZ-00002-000"]
    suffixes = ["a1", "a2", "a3", "a4", "lab"]
    make_release_tree(tmp_path / "data", ids, suffixes, sep="-", with_seg=False)
    with pytest.raises(CMFLError, match="no subjects found"):  # unknown before the entry is added
        discover(tmp_path / "data")
    with pytest.raises(CMFLError, match="unknown layout 'brats2025'"):
        subject_file_paths(tmp_path / "w", "brats2025", 1)

    monkeypatch.setattr(layouts, "NAMING_FAMILIES", (XYZ, *layouts.NAMING_FAMILIES))
    found = discover(tmp_path / "data")
    assert [s.subject_id for s in found] == ids
    s = found[0]
    assert s.layout == "brats2025" and s.et_label == 3 and s.grade is None
    # Internal channel order T1, T1c, T2, FLAIR maps to a1, a2, a3, a4; the label map is -lab.
    assert [p.rsplit("-", 1)[1] for p in s.images] == ["a1.nii.gz", "a2.nii.gz", "a3.nii.gz", "a4.nii.gz"]
    assert s.label == str(tmp_path / "data" / ids[0] / f"{ids[0]}-lab.nii.gz")

    # The same entry writes trees (the phantom's path) that read back as the same subjects.
    written = subject_file_paths(tmp_path / "w", "brats2025", 1)
    for p in (*written.images, written.label):
        touch(tmp_path / "w" / p)
    assert discover(tmp_path / "w") == [written]
    assert written.subject_id == ids[0] and written.et_label == 3

    # Its own suffixes name what is missing; the classic and 2023 families still work beside it.
    os.remove(s.images[1])
    with pytest.raises(CMFLError, match="missing modality a2"):
        discover(tmp_path / "data")
    make_release_tree(tmp_path / "mixed", ["BraTS2021_00000"], CLASSIC)
    make_release_tree(tmp_path / "mixed", ["BraTS-GLI-00000-000"], ["t1n", "t1c", "t2w", "t2f"], sep="-")
    make_release_tree(tmp_path / "mixed", ids[1:], suffixes, sep="-", with_seg=False)
    found = discover(tmp_path / "mixed")
    assert [(s.layout, s.et_label) for s in found] == [("brats2023", 3), ("brats2025", 3), ("brats2021", 4)]
