"""The report of ``experiments/device_check.py``: section statuses, pytest's counts and the Markdown
with one (device, what, figure) table a section; the pipeline's holds the balance of host and device."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from experiments.harness import table
from experiments.pipeline_balance import verdict

SECTIONS = ("device", "cmff_step", "cmft_step", "volume", "short_run", "pipeline", "tests")


def section_entries(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    entries = {}
    for section in SECTIONS:
        cases = [r for r in records if r["section"] == section]
        statuses = {c["status"] for c in cases}
        if cases:
            entries[section] = {"status": "failed" if "failed" in statuses else "ok" if "ok" in statuses else "skipped",
                                "cases": cases, "seconds": sum(c.get("wall_s", 0.0) for c in cases)}
    return entries


def junit_counts(path: str) -> dict[str, Any]:
    """Counts and failed test ids of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname', '').replace('.', '/')}.py::{c.get('name')}" for s in suites
              for c in s.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "failed_ids": failed[:10]}


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g} s"


def _mib(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"


def _peak(case: dict[str, Any]) -> tuple[str, str]:
    memory = case["memory"]
    return ("peak device memory" if memory["source"] == "device" else "peak process RSS"), _mib(memory["peak_mib"])


def section_title(section: str, payload: dict[str, Any]) -> str:
    z = payload["sizes"]
    p, b, d, v = z["patch"], z["base"], z["depth"], "×".join(map(str, z["volume"]))
    return {
        "device": "Device",
        "cmff_step": f"CMFF train step: {p}³ patch, base {b}, depth {d}, batch 1 (S_A + S_B + fusion branch, "
                     "mask-guided attention, Adam)",
        "cmft_step": f"CMFT train step: {p}³ patch, base {b}, depth {d}, batch 1 (G_AB, G_BA, D_A, D_B, each with "
                     "Adam)",
        "volume": f"Full-volume inference: {v} volume, {p}³ windows, 50 % overlap, Gaussian weighting, one window per "
                  "call (CMFF network, float32)",
        "short_run": f"Short CMFF run: {z['steps']} steps, {p}³ patches from the data pipeline ("
                     + (f"data root {z['data_root']}" if z["data_root"] else
                        f"{z['subjects']} synthetic subjects of {v}")
                     + f"), base {b}, depth {d}, batch 1, Adam {z['lr']:g}, Dice + {z['ce_weight']:g} × CE",
        "pipeline": f"Input pipeline: {p}³ patches of the short run's data through the training loop's "
                    f"`training_patches` on this machine's {payload['machine']['cpu_count']} CPU cores, against "
                    "the CMFF train step on this device (batch 1)",
        "tests": "Tests on this device",
    }[section]


def tests_rows(entry: dict[str, Any]) -> list[tuple[str, str]]:
    if entry["status"] == "skipped":
        return [("skipped", entry.get("reason", ""))]
    rows = [("tests", f"pytest -m '{entry['marker']}'")]
    if "passed" in entry:
        rows += [("passed / failed / errors / skipped",
                  f"{entry['passed']} / {entry['failed']} / {entry['errors']} / {entry['skipped']}")]
    rows.append(("time", _s(entry["seconds"])))
    if entry.get("failed_ids"):
        rows.append(("failed tests", ", ".join(entry["failed_ids"][:5])))
    if entry["status"] in ("failed", "incomplete"):
        rows.append((entry["status"].upper(), entry.get("error") or entry.get("reason", "")))
    return rows


def case_rows(section: str, case: dict[str, Any]) -> list[tuple[str, str]]:
    label = f"{case['dtype']}: " if "dtype" in case else (
        f"{'mirrored' if case['mirror'] else 'plain'}: " if "mirror" in case else "")
    if case["status"] == "skipped":
        return [(f"{label}skipped", case["reason"])]
    rows = [] if case["status"] == "ok" else [(f"{label}FAILED", case.get("error", ""))]
    if section == "pipeline" and case["status"] == "ok":
        return [(f"{_workers(case)}: patches/s", f"{case['patches_per_s']:.3g}")]
    if "memory" not in case:  # else it measured and then failed a check (a loss that did not fall)
        return rows
    mem = case["memory"]
    what, peak = _peak(case)
    if section == "device":
        ram = mem["source"] != "device"
        rows += [("platform", case["platform"]), ("device kind", case["device_kind"]),
                 ("devices", f"{case['count']} in {case['process_count']} process"
                             + ("es" if case["process_count"] > 1 else "")),
                 ("memory limit", _mib(mem["limit_mib"]) + (" (machine RAM)" if ram else
                                                            " (XLA allocator's bytes_limit)")),
                 ("memory in use after start-up" + (" (process RSS)" if ram else ""), _mib(mem["in_use_mib"])),
                 ("jax / jaxlib", f"{case['jax']} / {case['jaxlib']}")]
        rows += [("platform version", case["platform_version"])] if case.get("platform_version") else []
    elif section in ("cmff_step", "cmft_step"):
        xla = case["xla_train_memory"]
        rows += [(f"{label}compile", _s(case["compile_train_s"])),
                 (f"{label}step (median of {len(case['train']['times_s'])})", _s(case["train"]["median_s"])),
                 (f"{label}{what}", peak), (f"{label}XLA temp + args + out", _mib(xla and xla["total_mib"]))]
    elif section == "volume":
        rows += [(f"{label}compile", _s(case["compile_s"])),
                 (f"{label}s per subject ({case['windows']} windows)", _s(case["volume"]["median_s"])),
                 (f"{label}{what}", peak)]
    else:
        k = case["mean_over"]
        rows += [("data (generate / cache / load)", _s(case["data_s"])), ("compile", _s(case["compile_s"])),
                 (f"loss, mean of the first {k} steps", f"{case['loss_first']:.4g}"),
                 (f"loss, mean of the last {k} steps", f"{case['loss_last']:.4g}"),
                 ("time per step (data included)", _s(case["step_s"])), (what, peak)]
    return rows


def _workers(case: dict[str, Any]) -> str:
    where = f" on the {case['where']}" if case.get("augment", "none") != "none" else ""
    return f"augment {case['augment']}{where}, {case['workers']} worker{'s' if case['workers'] > 1 else ''}"


def balance_rows(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """The CMFF step's rate here (= patches/s it consumes at batch 1), XLA's FLOPs and the TFLOP/s they make, and
    whether each pipeline case keeps up with it."""
    cases = lambda name: [c for c in payload["sections"].get(name, {}).get("cases", []) if c["status"] == "ok"]
    rows = []
    for step in cases("cmff_step"):
        rate, flops = 1 / step["train"]["median_s"], step.get("xla_flops")
        rows.append((f"{step['dtype']} step: steps/s", f"{rate:.3g}"))
        if flops and (payload.get("device") or {}).get("platform") != "cpu":  # on a CPU oneDNN's calls count 0
            rows.append((f"{step['dtype']} step: XLA FLOPs, achieved", f"{flops / 1e12:.3g} TFLOP, "
                                                                       f"{flops * rate / 1e12:.3g} TFLOP/s"))
        rows += [(f"{_workers(c)} against the {step['dtype']} step", verdict(c["patches_per_s"], rate))
                 for c in cases("pipeline")]
    return rows


def device_label(payload: dict[str, Any]) -> str:
    dev = payload.get("device")
    if not dev:
        return "unknown"
    label = dev["device_kind"] if dev["platform"] != "cpu" else "cpu"
    return f"{label} ×{dev['count']}" if dev["count"] > 1 else label


def markdown(payload: dict[str, Any]) -> str:
    label = device_label(payload)
    lines = [f"# Device check: {label}, --size {payload['size']}", "",
             f"`{payload['command']}` ({payload['started']}, {payload['total_s']:.0f} s of a {payload['minutes']:g}-"
             f"minute budget; failed sections: {', '.join(payload['failed']) or 'none'})"]
    if payload.get("xla_flags"):
        lines.append(f"\nXLA_FLAGS of the measured cases: `{payload['xla_flags']}`")
    for section in SECTIONS:
        entry = payload["sections"].get(section)
        if entry is not None:
            rows = tests_rows(entry) if section == "tests" else [
                row for case in entry["cases"] for row in case_rows(section, case)]
            rows += balance_rows(payload) if section == "pipeline" else []
            lines += ["", f"## {section_title(section, payload)}", "",
                      table(["device", "what", "figure"], ([label, what, figure] for what, figure in rows))]
    return "\n".join(lines) + "\n"
