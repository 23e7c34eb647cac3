"""The Markdown tables and progress lines of ``experiments/benchmark.py``'s suites, from its records."""

from __future__ import annotations

from typing import Any

from experiments.harness import num, table

VOLUME_SHAPE = (240, 240, 155)  # a BraTS volume
VOLUME_WINDOW = 128
FRAMEWORK = {"jax_unet": "jax", "torch_unet": "torch", "jax_volume": "jax", "monai_volume": "torch",
             "jax_cmff_devices": "jax"}


def ok(record: dict[str, Any]) -> bool:
    return record.get("status") == "ok"


def torch_references(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Per (size, base, depth): the successful PyTorch record with the fastest train step (the comparator)."""
    refs: dict[tuple, dict[str, Any]] = {}
    for r in (r for r in records if r["kind"] == "torch_unet" and ok(r)):
        key = (r["size"], r["base"], r["depth"])
        if key not in refs or r["train"]["median_s"] < refs[key]["train"]["median_s"]:
            refs[key] = r
    return refs


def monai_reference(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The successful MONAI volume record (the volume comparator), if any."""
    return next((r for r in records if r["kind"] == "monai_volume" and ok(r)), None)


def _ratio(record: dict[str, Any] | None, ref: dict[str, Any] | None, part: str) -> float | None:
    if ref is None or record is None or not ok(record):
        return None
    return record[part]["median_s"] / ref[part]["median_s"]


def unet_table(records: list[dict[str, Any]]) -> str:
    """The unet suite, ratios against each size's PyTorch reference."""
    refs = torch_references(records)
    rows = []
    for r in records:
        ref = refs.get((r["size"], r["base"], r["depth"]))
        cells = [f"{r['size']}^3", FRAMEWORK[r["kind"]], r["impl"], r["dtype"]]
        if ok(r):
            cells += [num(r["compile_train_s"]), num(r["compile_forward_s"]), num(r["train"]["median_s"]),
                      num(r["forward"]["median_s"]), f"{r['peak_rss_mib']:.0f} ({r['baseline_rss_mib']:.0f})",
                      num(_ratio(r, ref, "train"), ".2f"), num(_ratio(r, ref, "forward"), ".2f")]
        rows.append(cells + ["-"] * (11 - len(cells))
                    + ["PyTorch reference" if ref is r else ("" if ok(r) else "FAILED: " + r.get("error", "")[:80])])
    head = ["size", "framework", "impl", "dtype", "compile train s", "compile fwd s", "train s (median)",
            "fwd s (median)", "peak RSS MiB (baseline)", "train / torch", "fwd / torch", "note"]
    return (table(head, rows) + "\n\nRatios: JAX (or the other PyTorch format) time / PyTorch reference time; below 1 "
            "is faster than PyTorch. Reference: the PyTorch memory format with the faster train step at that size. "
            "PyTorch is eager (no compile).")


def volume_table(records: list[dict[str, Any]]) -> str:
    """The volume suite: seconds per 240x240x155 subject, ratio against MONAI."""
    ref = monai_reference(records)
    rows = []
    for r in records:
        if not ok(r):
            rows.append([FRAMEWORK[r["kind"]], r["impl"], r["mirror"], f"FAILED: {r.get('error', '')[:60]}", "-", "-",
                         "-"])
            continue
        rows.append([FRAMEWORK[r["kind"]], r["impl"], "8 flips" if r["mirror"] else "no", num(r["compile_s"]),
                     num(r["volume"]["median_s"]), f"{r['peak_rss_mib']:.0f}", num(_ratio(r, ref, "volume"), ".2f")])
    head = ["framework", "impl", "mirroring", "compile s", "s per subject (median)", "peak RSS MiB", "/ MONAI"]
    return (table(head, rows) + f"\n\nOne {'x'.join(map(str, VOLUME_SHAPE))} volume, 2 channels, {VOLUME_WINDOW}^3 "
            "windows, 50 % overlap, Gaussian weighting, 1 window per call; MONAI: sliding_window_inference over the "
            "PyTorch twin (eager, inference_mode).")


def goal_table(records: list[dict[str, Any]]) -> str:
    """One row per goal (train step per size, full-volume inference): cmfl_jax's best against PyTorch/MONAI, then
    the unet and volume tables the numbers come from."""
    unet = [r for r in records if r["kind"].endswith("_unet")]
    volume = [r for r in records if r["kind"].endswith("_volume")]
    refs, rows, goals = torch_references(unet), [], []
    for size in sorted({r["size"] for r in unet}):
        group = [r for r in unet if r["size"] == size]
        goals.append((f"train step {size}^3", group, refs.get((size, group[0]["base"], group[0]["depth"])), "train"))
    if volume:
        goals.append((f"full volume {'x'.join(map(str, VOLUME_SHAPE))}", volume, monai_reference(volume), "volume"))
    for goal, group, ref, part in goals:
        best = min((r for r in group if r["kind"] in ("jax_unet", "jax_volume") and ok(r)),
                   key=lambda r: r[part]["median_s"], default=None)
        rows.append([goal, num(ref[part]["median_s"]) if ref else "-",
                     f"{num(best[part]['median_s'])} ({best['impl']}, {best.get('dtype', 'float32')})" if best else "-",
                     num(_ratio(best, ref, part), ".2f")])
    head = ["goal", "PyTorch/MONAI s", "cmfl_jax s (impl, dtype)", "cmfl_jax / PyTorch"]
    parts = [table(head, rows), "", "The goal: every ratio at or below 1.00.", "", unet_table(unet)]
    return "\n".join(parts + (["", volume_table(volume)] if volume else []))


def _mib(memory: dict[str, float] | None) -> str:
    return f"{memory['total_mib']:.0f}" if memory else "-"


def devices_table(records: list[dict[str, Any]]) -> str:
    """The devices suite: steps/s and samples/s of the CMFF step per device count."""
    rows = []
    for r in records:
        cells = [r.get("job", "cmff"), f"{r['size']}^3", f"{r['base']}/{r['depth']}", r["impl"], r["dtype"],
                 str(r["devices"])]
        if ok(r):
            timed = r["train"] is not None  # else compile only
            cells += [str(r["global_batch"]), num(r["compile_train_s"]),
                      num(r["train"]["median_s"]) if timed else "(not run)", num(r.get("steps_per_s")),
                      num(r.get("samples_per_s")), f"{r['peak_rss_mib']:.0f}", _mib(r.get("xla_train_memory"))]
        else:
            cells += ["FAILED: " + r.get("error", "")[:60]] + ["-"] * 6
        rows.append(cells)
    head = ["step", "size", "base/depth", "impl", "dtype", "devices", "global batch", "compile s", "step s (median)",
            "steps/s", "samples/s", "peak RSS MiB", "XLA temp+args+out MiB"]
    return (table(head, rows) + "\n\nThe cmff train step (S_A + S_B + fusion branch with mask-guided attention, "
            "Adam) or the cmft one (G_AB, G_BA, D_A, D_B, four Adam states), "
            "data parallel: batch split over the devices, states replicated, global batch = devices x 1. The devices "
            "are forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) sharing the same CPU cores: "
            "this shows that the sharded step runs and what its overhead is, not a speed-up. XLA column: temp + "
            "argument + output - aliased (donated) bytes of the compiled step, per device.")
