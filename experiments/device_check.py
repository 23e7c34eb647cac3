"""One command that measures whatever accelerator JAX sees, at the paper's sizes, in a fixed time budget.

    python -m experiments.device_check [--out DIR] [--size smoke|full] [--skip-tests] [--minutes N] [--sections ...]

``--size`` picks the variant of ``configs/cmff.py`` and ``configs/cmft.py``. Sections, each case in a fresh process
(``experiments/harness.py``; this one never touches a device): ``device``, ``cmff_step``, ``cmft_step``, ``volume``,
``short_run`` (the loss must fall), ``pipeline`` (the host's patches/s against the CMFF step's rate here:
``experiments/pipeline_balance.py``) and ``tests`` (``pytest -m device_check``). A case the budget cannot hold is
skipped, a failing one recorded with its error. Writes ``device_check.json`` and ``.md`` into ``--out`` after every
case; exits 1 if a section failed. docs/device_check.md has the details.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from experiments import harness, pipeline_balance, programs
from experiments.device_check_report import SECTIONS, junit_counts, markdown, section_entries

# The tests' environment (where not set already): no preallocation of accelerator memory, and float32 matmuls and
# convolutions at full precision (a GPU's TF32 would break tolerances chosen for float32).
TEST_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
# XLA's CPU flags that halve compile times of tiny models (as tests/conftest.py): smoke figures show that each
# section runs, not how fast a real run is. Full size: XLA's defaults.
SMOKE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
# What --size adds to the configs' variant: timed calls, the short run, the budget, and the seconds one case of each
# section needs at least (less left: skipped).
SETTINGS = {
    "full": dict(minutes=7.5, repeats=5, volume_repeats=1, run_steps=200, run_lr=1e-3, subjects=2,
                 dtypes=("float32", "bfloat16", "float16"), xla_flags=(), workers=(1, 4, 8), patches=16,
                 needs=dict(device=30, cmff_step=60, cmft_step=90, volume=60, short_run=120, pipeline=30, tests=60)),
    "smoke": dict(minutes=10.0, repeats=3, volume_repeats=2, run_steps=10, run_lr=1e-2, subjects=4,
                  dtypes=("float32",), xla_flags=SMOKE_XLA_FLAGS,  # CI time: bf16 on a CPU measures nothing
                  workers=(1,), patches=3,
                  needs=dict(device=15, cmff_step=30, cmft_step=45, volume=30, short_run=60, pipeline=15, tests=60)),
}


def run_device(case: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import jaxlib

    devices = jax.devices()
    n = 512
    product = float(jnp.sum(jnp.ones((n, n), jnp.float32) @ jnp.ones((n, n), jnp.float32)))
    if product != n**3:
        raise RuntimeError(f"a {n}x{n} matmul of ones summed to {product}, not {n**3}")
    try:
        version = str(devices[0].client.platform_version)
    except Exception:
        version = None
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "count": len(devices),
            "process_count": jax.process_count(), "devices": [str(d) for d in devices[:16]],
            "platform_version": version, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "memory": harness.memory_figures()}


def run_short_run(case: dict[str, Any]) -> dict[str, Any]:
    """``train.steps`` CMFF steps on the data pipeline's patches; the mean loss of the first and last tenth."""
    import jax

    from cmfl_jax import sharding
    from cmfl_jax.data.dataset import load_entries
    from cmfl_jax.data.pipeline import patch_dataset
    from cmfl_jax.training.loop import device_batch, to_device

    config = programs.load_config(case["config"], case["overrides"])
    t0 = time.perf_counter()
    entries = load_entries(config.data)
    data_s = time.perf_counter() - t0
    d, steps = config.data, config.train.steps
    patches = iter(patch_dataset(entries, d.patch_size, seed=programs.SEED, batch_size=1, tumour_prob=d.tumour_prob))
    mesh = sharding.make_mesh(jax.devices()[:1])
    step, states, _ = programs.job_step(config, mesh)
    batches = (to_device(device_batch(next(patches), ("image", "label")), mesh) for _ in range(steps))
    batch = next(batches)
    t0 = time.perf_counter()
    step = step.lower(states, batch).compile()
    compile_s, losses = time.perf_counter() - t0, []
    t0 = time.perf_counter()
    for i in range(steps):
        states, metrics = step(states, batch if i == 0 else next(batches))
        losses.append(float(metrics["loss"]))
    loop_s = time.perf_counter() - t0
    k = max(2, steps // 10)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    record = {"subjects": len(entries), "data_s": data_s, "compile_s": compile_s, "loop_s": loop_s,
              "step_s": loop_s / steps, "mean_over": k, "loss_first": first, "loss_last": last, "losses": losses,
              "memory": harness.memory_figures()}
    if not (math.isfinite(first) and math.isfinite(last) and last < first):
        record.update(status="failed", error=f"the loss did not fall: mean {first:.4g} over the first {k} steps, "
                                             f"{last:.4g} over the last {k}")
    return record


RUNNERS = {"device": run_device, "step": programs.run_step, "volume": programs.run_volume, "short_run": run_short_run,
           "patches": pipeline_balance.run_patches}


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    """What the sections run at: the configs' variant, ``SETTINGS`` and the command line."""
    config = programs.load_config(f"configs/cmff.py:{args.size}")
    s = SETTINGS[args.size]
    return dict(patch=config.data.patch_size[0], base=config.model.base, depth=config.model.depth,
                volume=list(config.data.synthetic.shape), subjects=s["subjects"], lr=s["run_lr"], ce_weight=1.0,
                steps=args.run_steps or s["run_steps"], data_root=args.data_root or "")


def section_cases(section: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    s, z = SETTINGS[args.size], sizes(args)
    cmff = dict(config=f"configs/cmff.py:{args.size}", overrides={"init.mode": "random", "train.batch_size": 1})
    if section == "device":
        return [dict(kind="device", section=section)]
    if section in ("cmff_step", "cmft_step"):
        job = dict(cmff, config=f"configs/cmft.py:{args.size}", overrides={"train.batch_size": 1}) if (
            section == "cmft_step") else cmff
        return [dict(kind="step", section=section, dtype=dtype, devices=1, repeats=s["repeats"], warmup=1,
                     config=job["config"], overrides={**job["overrides"], "model.dtype": dtype})
                for dtype in s["dtypes"]]
    if section == "volume":
        return [dict(kind="volume", section=section, net="cmff", mirror=m, window=z["patch"], volume=z["volume"],
                     repeats=s["volume_repeats"], warmup=1, seed=programs.SEED, **cmff) for m in (False, True)]
    data = {"data.root": z["data_root"], "data.synthetic.n": z["subjects"], "train.batch_size": 1}
    if section == "pipeline":  # the short run's data; augmentation on the host, or its host side for the device
        return [dict(kind="patches", section=section, augment=a, where=w, workers=n, patches=s["patches"], warmup=1,
                     config=cmff["config"], overrides={**data, "data.augment.preset": a, "data.augment.where": w,
                                                       "data.num_workers": n})
                for a, w in (("none", "host"), ("nnunet", "host"), ("nnunet", "device")) for n in s["workers"]]
    run = {**data, "train.steps": z["steps"], "cmff.lr": z["lr"], "cmff.ce_weight": z["ce_weight"]}
    return [dict(kind="short_run", section=section, steps=z["steps"], data_root=z["data_root"],
                 config=cmff["config"], overrides={**cmff["overrides"], **run})]


def run_tests(marker: str, timeout: float, paths: tuple[str, ...] = ("tests",)) -> dict[str, Any]:
    """``pytest -m marker`` in one subprocess: its exit status and JUnit report. Stopped at ``timeout`` with SIGINT,
    pytest still writes the report, so a run cut short keeps its counts."""
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in TEST_ENV.items()}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                                 "-m", marker, f"--junitxml={xml}", *paths], cwd=harness.REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            output, cut = proc.communicate(timeout=max(timeout, 1.0))[0], False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            output, cut = proc.communicate()[0], True
        counts = junit_counts(xml) if os.path.isfile(xml) else dict(passed=0, failed=0, errors=0, skipped=0,
                                                                     failed_ids=[])
    seconds, bad = time.perf_counter() - t0, counts["failed"] + counts["errors"]
    record = {"marker": marker, "seconds": seconds, "returncode": proc.returncode, "env": {k: env[k] for k in TEST_ENV},
              **counts, "status": "failed" if bad or (proc.returncode and not cut) else "incomplete" if cut else "ok"}
    if cut:
        record["reason"] = (f"stopped at the --minutes budget after {seconds:.0f} s: {counts['passed']} passed, {bad} "
                            "failed")
    if record["status"] == "failed":
        tail = [line for line in output.splitlines() if line.strip()] or [""]
        record["error"] = record.get("reason") or (
            f"{counts['failed']} failed, {counts['errors']} errors: {', '.join(counts['failed_ids'][:3])}" if bad
            else f"pytest exit code {proc.returncode}: {tail[-1]}")
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SETTINGS), default="full",
                        help="variant of configs/cmff.py and configs/cmft.py: full (GPU/TPU) or smoke (CPU, CI)")
    parser.add_argument("--out", help="folder of device_check.json and .md (default "
                                      "experiments/results/device_check/<platform>)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the device-relevant tests")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="the sections to run (default: all), e.g. device cmff_step pipeline for the balance")
    parser.add_argument("--marker", default="device_check", help="pytest -m expression of the tests section")
    parser.add_argument("--minutes", type=float, help="time budget (default: 7.5 for full, 10 for smoke)")
    parser.add_argument("--data-root", help="short run on this BraTS folder instead of the built-in synthetic data")
    parser.add_argument("--run-steps", type=int, help="steps of the short run (default: 200 for full, 10 for smoke)")
    args = parser.parse_args(argv)
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.run_steps is not None and args.run_steps < 2:
        parser.error("--run-steps must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = SETTINGS[args.size]
    minutes = args.minutes or s["minutes"]
    t_start = time.perf_counter()
    deadline = t_start + 60 * minutes
    payload: dict[str, Any] = {
        "size": args.size, "minutes": minutes, "started": harness.now(), "sizes": sizes(args),
        "command": harness.command("experiments.device_check", argv), "machine": harness.machine_info(),
        "xla_flags": harness.child_env(s["xla_flags"])["XLA_FLAGS"], "device": None, "sections": {}, "failed": []}

    def save(records: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
        device = next((r for r in records if r["section"] == "device" and r["status"] == "ok"), None)
        payload["device"] = device and {k: device[k] for k in ("platform", "device_kind", "count", "jax")}
        payload["sections"] = {**section_entries(records), **(extra or {})}
        payload["failed"] = [name for name, entry in payload["sections"].items() if entry["status"] == "failed"]
        payload["total_s"] = time.perf_counter() - t_start
        out = args.out or os.path.join(harness.REPO, "experiments", "results", "device_check",
                                       device["platform"] if device else "unknown")
        text = markdown(payload)
        harness.write_outputs(os.path.join(out, "device_check.json"), payload, text)
        return out

    def skip(case: dict[str, Any]) -> str | None:
        left, need = deadline - time.perf_counter(), s["needs"][case["section"]]
        return None if left >= need else (f"needs ~{need:.0f} s, {max(left, 0):.0f} s left of the {minutes:g}-minute "
                                          "budget (--minutes)")

    cases = [case for section in SECTIONS[:-1] if section in args.sections for case in section_cases(section, args)]
    records = harness.run_cases("experiments.device_check", cases, save,
                                timeout=lambda case: deadline - time.perf_counter(), skip=skip,
                                env=lambda case: harness.child_env(s["xla_flags"]))
    reason = "--skip-tests" if args.skip_tests else (
        "not in --sections" if "tests" not in args.sections else skip({"section": "tests"}))
    if reason:
        tests = {"status": "skipped", "reason": reason}
    else:
        print(f"[tests] pytest -m '{args.marker}' ...", flush=True)
        tests = run_tests(args.marker, deadline - time.perf_counter())
    counts = f"{tests.get('passed')} passed, {tests.get('failed')} failed, {tests.get('errors')} errors"
    print(f"[tests] {tests['status']}: {tests.get('error') or tests.get('reason') or counts}", flush=True)
    out = save(records, {"tests": tests})
    print(f"\n{markdown(payload)}\nwrote {out}/device_check.json and device_check.md")
    return 1 if payload["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
