"""experiments/device_check.py: the smoke run measures every section on CPU, runs the device tests (pytest -m
device_check) and writes its JSON and tables; the budget skips what it cannot hold; a failing case is recorded,
not raised; the tests section counts pytest's JUnit report, also of a run stopped at the budget."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from experiments import device_check, harness
from experiments.device_check_report import SECTIONS, case_rows
from experiments.pipeline_balance import verdict

from .conftest import REPO

TABLE_HEAD = "| device | what | figure |"


def _positive(x) -> bool:
    return isinstance(x, int | float) and x > 0


@pytest.mark.slow
def test_smoke_run_measures_every_section_and_runs_the_device_tests(tmp_path):
    out = tmp_path / "out"
    # --minutes well above the few minutes this takes on 2 shared cores: a loaded machine must not skip a section.
    # The tests section: the device tests that are not slow (the slow ones are the CI's other lane), of two files
    # only (-k; the suite runs them all anyway): test_losses.py's, all marked device_check, and test_metrics.py's,
    # none marked, so the count shows that the marker selects.
    cmd = [sys.executable, "-m", "experiments.device_check", "--size", "smoke", "--marker", "device_check and not slow",
           "--out", str(out), "--minutes", "30"]
    env = {**os.environ, "PYTEST_ADDOPTS": "-k 'test_losses.py or test_metrics.py'"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=2400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "device_check.json").read_text())
    assert report["size"] == "smoke" and report["failed"] == []
    assert report["sizes"] == dict(patch=32, base=4, depth=2, volume=[48, 48, 48], subjects=4, lr=0.01, ce_weight=1.0,
                                   steps=10, data_root="")  # configs/cmff.py:smoke
    sections = report["sections"]
    assert list(sections) == list(SECTIONS)
    for name in SECTIONS[:-1]:
        assert sections[name]["status"] == "ok", (name, sections[name])
        assert all(case["status"] == "ok" for case in sections[name]["cases"]), name

    (device,) = sections["device"]["cases"]
    assert device["platform"] == "cpu" and device["count"] >= 1 and device["jax"] and device["jaxlib"]
    assert device["memory"]["source"] == "process RSS" and _positive(device["memory"]["limit_mib"])

    for name in ("cmff_step", "cmft_step"):
        (case,) = sections[name]["cases"]  # smoke: float32 only; full: both (test_full_size_reads_the_full_configs)
        assert case["dtype"] == "float32" and case["config"] == f"configs/{name[:4]}.py:smoke"
        assert _positive(case["compile_train_s"]) and _positive(case["train"]["median_s"]), (name, case)
        assert len(case["train"]["times_s"]) == 3 and case["global_batch"] == 1
        assert _positive(case["memory"]["peak_mib"]) and _positive(case["xla_train_memory"]["total_mib"]), (name, case)

    volume = {case["mirror"]: case for case in sections["volume"]["cases"]}
    assert set(volume) == {False, True}
    assert _positive(volume[False]["volume"]["median_s"]) and _positive(volume[True]["compile_s"])
    assert volume[True]["volume"]["median_s"] >= volume[False]["volume"]["median_s"]  # 8 forward passes a window
    assert volume[False]["windows"] == 8  # 48^3 in 32^3 windows at 50 % overlap: 2 per axis

    (run,) = sections["short_run"]["cases"]
    assert len(run["losses"]) == run["steps"] == 10 and run["subjects"] == 4
    assert run["loss_last"] < run["loss_first"], run["losses"]
    assert _positive(run["compile_s"]) and _positive(run["step_s"])

    patches = {(case["augment"], case["where"]): case for case in sections["pipeline"]["cases"]}
    assert set(patches) == {("none", "host"), ("nnunet", "host"), ("nnunet", "device")}
    for c in patches.values():
        assert c["workers"] == 1 and c["subjects"] == 4 and len(c["timing"]["times_s"]) == 3, c
        assert _positive(c["patches_per_s"]), c

    tests = sections["tests"]
    assert tests["status"] == "ok" and tests["returncode"] == 0, tests
    with open(os.path.join(REPO, "tests", "test_losses.py")) as f:
        source = f.read()
    assert "pytestmark = pytest.mark.device_check" in source and "parametrize" not in source and "slow" not in source
    assert tests["passed"] == len(re.findall(r"^def test_", source, re.M)) > 10, tests  # test_losses.py's alone
    assert tests["failed"] == tests["errors"] == 0, tests
    assert tests["env"]["JAX_DEFAULT_MATMUL_PRECISION"] == "highest"

    table = (out / "device_check.md").read_text()
    assert table.count(TABLE_HEAD) == len(SECTIONS)
    for title in ("## Device", "## CMFF train step: 32³", "## CMFT train step: 32³",
                  "## Full-volume inference: 48×48×48", "## Short CMFF run: 10 steps", "## Input pipeline: 32³",
                  "## Tests on this device"):
        assert title in table, title
    assert "| cpu | float32: step (median of 3) |" in table
    assert "| cpu | mirrored: s per subject (8 windows) |" in table
    rate = 1 / sections["cmff_step"]["cases"][0]["train"]["median_s"]
    have = patches["nnunet", "host"]["patches_per_s"]
    assert f"| cpu | float32 step: steps/s | {rate:.3g} |" in table
    assert f"| cpu | augment nnunet on the host, 1 worker against the float32 step | {verdict(have, rate)} |" in table
    assert f"| cpu | passed / failed / errors / skipped | {tests['passed']} / 0 / 0 / " in table
    assert table in proc.stdout  # printed as written


def test_budget_skips_what_it_cannot_hold(tmp_path):
    rc = device_check.main(["--size", "smoke", "--minutes", "0.001", "--out", str(tmp_path)])
    assert rc == 0  # skipped is not failed
    report = json.loads((tmp_path / "device_check.json").read_text())
    for name in SECTIONS:
        cases = report["sections"][name].get("cases", [report["sections"][name]])
        assert report["sections"][name]["status"] == "skipped" and all("--minutes" in c["reason"] for c in cases)
    assert "| unknown | skipped | needs ~" in (tmp_path / "device_check.md").read_text()


def test_sections_pick_what_runs(tmp_path):
    device_check.main(["--size", "smoke", "--minutes", "0.001", "--sections", "device", "pipeline", "--out",
                       str(tmp_path)])
    sections = json.loads((tmp_path / "device_check.json").read_text())["sections"]
    assert list(sections) == ["device", "pipeline", "tests"] and sections["tests"]["reason"] == "not in --sections"
    assert [(c["augment"], c["where"]) for c in sections["pipeline"]["cases"]] == [  # smoke: 1 worker each
        ("none", "host"), ("nnunet", "host"), ("nnunet", "device")]


def test_failed_case_is_one_line_and_the_table_says_so():
    record = harness.run_case_subprocess("experiments.device_check", {"kind": "no_such", "section": "volume",
                                                                      "mirror": True}, timeout=120)
    assert record["status"] == "failed" and record["error"] == "KeyError: 'no_such'", record
    assert case_rows("volume", record) == [("mirrored: FAILED", record["error"])]


def test_full_size_reads_the_full_configs():
    args = device_check.parse_args(["--size", "full"])
    assert device_check.sizes(args) == dict(patch=128, base=16, depth=4, volume=[240, 240, 155], subjects=2, lr=1e-3,
                                            ce_weight=1.0, steps=200, data_root="")
    steps = device_check.section_cases("cmff_step", args) + device_check.section_cases("cmft_step", args)
    assert [(c["config"], c["dtype"], c["overrides"]["model.dtype"]) for c in steps] == [
        (f"configs/{job}.py:full", dtype, dtype) for job in ("cmff", "cmft")
        for dtype in ("float32", "bfloat16", "float16")]
    assert steps[0]["overrides"]["init.mode"] == "random" and steps[0]["repeats"] == 5
    pipeline = device_check.section_cases("pipeline", args)
    assert [(c["augment"], c["where"], c["workers"], c["overrides"]["data.synthetic.n"]) for c in pipeline] == [
        (a, w, n, 2) for a, w in (("none", "host"), ("nnunet", "host"), ("nnunet", "device")) for n in (1, 4, 8)]
    assert pipeline[0]["config"] == "configs/cmff.py:full" and pipeline[0]["kind"] == "patches"


@pytest.mark.slow
def test_tests_section_counts_the_junit_report_of_a_run_stopped_at_the_budget(tmp_path):
    (tmp_path / "test_some.py").write_text(
        "import time\n\nimport pytest\n\npytestmark = pytest.mark.device_check\n\n\n"
        "def test_passes():\n    pass\n\n\ndef test_fails():\n    assert 1 == 2\n\n\n"
        "def test_too_long():\n    time.sleep(600)\n\n\n@pytest.mark.skip\ndef test_never():\n    pass\n")
    record = device_check.run_tests("device_check", 10, (str(tmp_path),))  # pytest starts well within it
    assert (record["passed"], record["failed"], record["errors"]) == (1, 1, 0), record
    assert record["status"] == "failed" and "stopped at the --minutes budget" in record["error"]
    assert len(record["failed_ids"]) == 1 and record["failed_ids"][0].endswith("test_some.py::test_fails"), record
    assert 10 <= record["seconds"] < 100
