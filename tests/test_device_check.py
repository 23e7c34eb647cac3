"""experiments/device_check.py: the smoke run measures every section on CPU and writes its JSON and tables;
the budget skips what it cannot hold; a failing case is recorded, not raised; pytest output is counted."""

from __future__ import annotations

import json
import subprocess
import sys

from experiments import device_check

from .conftest import REPO

TABLE_HEAD = "| device | what | figure |"


def _positive(x) -> bool:
    return isinstance(x, int | float) and x > 0


def test_smoke_run_measures_every_section(tmp_path):
    out = tmp_path / "out"
    # --minutes well above the ~2-5 minutes this takes on 2 shared cores: a loaded machine must not skip a section.
    cmd = [sys.executable, "-m", "experiments.device_check", "--size", "smoke", "--skip-tests", "--out", str(out),
           "--minutes", "30"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "device_check.json").read_text())
    assert report["size"] == "smoke" and report["failed"] == []
    sections = report["sections"]
    assert list(sections) == list(device_check.SECTIONS)
    assert sections["tests"] == {"status": "skipped", "reason": "--skip-tests", "seconds": sections["tests"]["seconds"]}
    for name in ("device", "cmff_step", "cmft_step", "volume", "short_run"):
        assert sections[name]["status"] == "ok", (name, sections[name])
        assert all(case["status"] == "ok" for case in sections[name]["cases"]), name

    (device,) = sections["device"]["cases"]
    assert device["platform"] == "cpu" and device["count"] >= 1 and device["jax"] and device["jaxlib"]
    assert device["memory"]["source"] == "process RSS" and _positive(device["memory"]["limit_mib"])

    for name in ("cmff_step", "cmft_step"):
        cases = {case["dtype"]: case for case in sections[name]["cases"]}
        assert set(cases) == {"float32"}, name  # smoke: float32 only; full: both (test_full_size_measures_both)
        for case in cases.values():
            assert _positive(case["compile_s"]) and _positive(case["step_s"]), (name, case)
            assert _positive(case["memory"]["peak_mib"]) and _positive(case["xla_mib"]), (name, case)
            assert case["patch"] == 32 and case["base"] == 4 and case["depth"] == 2

    volume = {case["mirror"]: case for case in sections["volume"]["cases"]}
    assert set(volume) == {False, True}
    assert _positive(volume[False]["s_per_subject"]) and _positive(volume[True]["compile_s"])
    assert volume[True]["s_per_subject"] >= volume[False]["s_per_subject"]  # 8 forward passes per window
    assert volume[False]["windows"] == 8  # 48^3 in 32^3 windows at 50 % overlap: 2 per axis

    (run,) = sections["short_run"]["cases"]
    assert len(run["losses"]) == run["steps"] == 10
    assert run["loss_last"] < run["loss_first"], run["losses"]
    assert _positive(run["compile_s"]) and _positive(run["step_s"])

    table = (out / "device_check.md").read_text()
    assert table.count(TABLE_HEAD) == len(device_check.SECTIONS)
    for title in ("## Device", "## CMFF train step: 32³", "## CMFT train step: 32³",
                  "## Full-volume inference: 48×48×48", "## Short CMFF run: 10 steps", "## Tests on this device"):
        assert title in table, title
    assert "| cpu | float32: step (median of 3) |" in table
    assert "| cpu | mirrored: s per subject (8 windows) |" in table
    assert table in proc.stdout  # printed as written


def test_budget_skips_what_it_cannot_hold(tmp_path):
    rc = device_check.main(["--size", "smoke", "--minutes", "0.001", "--out", str(tmp_path)])
    assert rc == 0  # skipped is not failed
    report = json.loads((tmp_path / "device_check.json").read_text())
    for name in ("device", "cmff_step", "cmft_step", "volume", "short_run"):
        assert report["sections"][name]["status"] == "skipped"
        assert all("--minutes" in case["reason"] for case in report["sections"][name]["cases"])
    assert report["sections"]["tests"]["status"] == "skipped"
    assert "| unknown | skipped | needs ~" in (tmp_path / "device_check.md").read_text()


def test_failed_case_is_one_line_and_the_table_says_so():
    record = device_check.run_child({"section": "no_such_section"}, timeout=120)
    assert record["status"] == "failed" and record["error"].startswith("KeyError"), record
    rows = device_check.section_rows("volume", {"status": "failed", "cases": [{**record, "mirror": True}]})
    assert rows == [("mirrored: FAILED", record["error"])]


def test_parse_pytest_counts_finished_and_cut_short_runs():
    lines = ["tests/test_a.py::test_one PASSED                   [ 33%]",
             "tests/test_a.py::test_two[x-1] FAILED              [ 66%]",
             "tests/test_b.py::test_three SKIPPED (no gpu)       [100%]"]
    cut = device_check.parse_pytest("\n".join(lines))
    assert (cut["passed"], cut["failed"], cut["skipped"], cut["finished"]) == (1, 1, 1, False)
    assert cut["failed_ids"] == ["tests/test_a.py::test_two[x-1]"]
    done = device_check.parse_pytest("\n".join([*lines, "ERROR tests/test_c.py",
                                                "==== 1 failed, 1 passed, 1 skipped, 1 error in 3.21s ===="]))
    assert (done["passed"], done["failed"], done["errors"], done["skipped"], done["finished"]) == (1, 1, 1, 1, True)


def test_full_size_measures_float32_and_bfloat16():
    assert device_check.SIZES["full"].dtypes == ("float32", "bfloat16")
    assert device_check.SIZES["full"].patch == 128 and device_check.SIZES["full"].base == 16
