"""One command that measures whatever accelerator JAX sees, at the paper's sizes, in a fixed time budget.

    python -m experiments.device_check [--out DIR] [--size smoke|full] [--skip-tests] [--minutes N]

Sections, in this order (each case in a fresh subprocess, so its compile is cold and its peak memory its own;
this process never touches a device, so it holds no accelerator memory):

* ``device``: platform, device kind, count, memory (``device.memory_stats()``: ``bytes_limit`` and
  ``peak_bytes_in_use`` where the backend has them; on CPU the machine's RAM and the process RSS), jax and
  jaxlib versions, a tiny matmul that must give the exact answer;
* ``cmff_step``: the paper's CMFF train step (S_A + S_B + fusion branch, mask-guided attention, Adam; random
  init) in float32 and bfloat16: cold compile time, median step time over a few steps, peak memory, XLA's
  buffer sizes;
* ``cmft_step``: the CMFT train step (G_AB, G_BA, D_A, D_B) the same way;
* ``volume``: full-volume sliding-window inference of the CMFF network (50 % overlap, Gaussian weighting, one
  window per call), without and with 8-flip mirroring: seconds per subject;
* ``short_run``: a short CMFF run on patches from the data pipeline (the built-in synthetic data, or
  ``--data-root``): the first and last mean loss must fall;
* ``tests``: pytest on a short list of device-relevant test files, in a subprocess, float32 at full precision
  (``TEST_ENV``; ``--skip-tests`` skips it). It runs last: the measurements come first when the budget is short.

``--size full`` (the default) is the paper's setting: 128^3 patches, U-Net base 16, depth 4, batch 1, a
240x240x155 volume with 128^3 windows, 200 steps; it is meant for a GPU or TPU, with a default budget of 7.5
minutes (not yet run on one). ``--size smoke`` runs everything at tiny sizes (32^3 patches, base 4, depth 2, a
48^3 volume with 32^3 windows, 10 steps) in minutes on a CPU, most of it XLA compiling. A case that the remaining
budget cannot hold is skipped with the reason; a case that fails (out of memory, a crash, its time running out) is
recorded with its one-line error and the rest continues. Writes ``device_check.json`` and ``device_check.md`` into
``--out`` (default ``experiments/results/device_check/<platform>``) after every case, prints the Markdown, and
exits 1 if any section failed (a skipped one is not a failure).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments.benchmark import _error_line, _memory_analysis, current_rss_mib, measure, peak_rss_mib, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "DEVICE_CHECK_RESULT "
IMAGE_CHANNELS = 4  # T1, T1c, T2, FLAIR
LABEL_VALUES = (0, 1, 2, 4)
OVERLAP = 0.5
SEED = 0
# Test files whose tests compile and run models, convolutions, losses and inference on the default device.
DEVICE_TESTS = ("tests/test_models_core.py", "tests/test_conv_strided.py", "tests/test_losses.py",
                "tests/test_inference.py", "tests/test_mixed_precision.py")
# The tests' environment (where not set already): no preallocation of accelerator memory, and float32 matmuls and
# convolutions at full precision, so that a GPU's TF32 default does not break tolerances chosen for float32 (the
# measurement sections keep JAX's default precision).
TEST_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
# XLA's CPU flags that halve compile times for tiny models (tests/conftest.py uses the same): the smoke size sets
# them in its cases, whose figures show that each section runs, not how fast a real run is. Full size: XLA's defaults.
SMOKE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
SECTIONS = ("device", "cmff_step", "cmft_step", "volume", "short_run", "tests")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Size:
    """Everything ``--size`` decides."""

    variant: str  # of configs/cmff.py and configs/cmft.py
    patch: int  # train patch edge
    base: int
    depth: int
    window: int  # sliding-window edge of the volume section
    volume: tuple[int, int, int]
    timed_steps: int  # timed step calls after one warm-up
    volume_repeats: int
    run_steps: int
    run_lr: float
    run_ce_weight: float
    run_subjects: int  # synthetic subjects generated for the short run
    minutes: float  # default --minutes
    xla_flags: tuple[str, ...]  # added to XLA_FLAGS in the cases (unless XLA_FLAGS sets them already)
    needs: dict[str, float]  # seconds one case of each section needs at least; less left: skipped
    dtypes: tuple[str, ...] = DTYPES  # of the train steps; smoke: float32 (bf16 is what accelerators measure)


SIZES = {
    "full": Size(variant="full", patch=128, base=16, depth=4, window=128, volume=(240, 240, 155), timed_steps=5,
                 volume_repeats=1, run_steps=200, run_lr=1e-3, run_ce_weight=1.0, run_subjects=2, minutes=7.5,
                 xla_flags=(),
                 needs={"device": 30, "cmff_step": 60, "cmft_step": 90, "volume": 60, "short_run": 120,
                        "tests": 60}),
    "smoke": Size(variant="smoke", patch=32, base=4, depth=2, window=32, volume=(48, 48, 48), timed_steps=3,
                  volume_repeats=2, run_steps=10, run_lr=1e-2, run_ce_weight=1.0, run_subjects=4, minutes=10.0,
                  xla_flags=SMOKE_XLA_FLAGS, dtypes=("float32",),  # CI time: bf16 on a CPU measures nothing
                  needs={"device": 15, "cmff_step": 30, "cmft_step": 45, "volume": 30, "short_run": 60,
                         "tests": 60}),
}


# --------------------------------------------------------------------------------------------------- child side


def memory_figures() -> dict[str, Any]:
    """Peak and limit of the default device's memory (``memory_stats``), else the process RSS and machine RAM."""
    import jax

    device = jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {"source": "device", "peak_mib": stats["peak_bytes_in_use"] / 2**20,
                "in_use_mib": stats.get("bytes_in_use", 0) / 2**20,
                "limit_mib": stats["bytes_limit"] / 2**20 if "bytes_limit" in stats else None}
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        ram = None
    return {"source": "process RSS", "peak_mib": peak_rss_mib(), "in_use_mib": current_rss_mib(), "limit_mib": ram}


def _xla_mib(compiled: Any) -> float | None:
    """XLA's temp + argument + output - aliased (donated) bytes of a compiled function, MiB."""
    m = _memory_analysis(compiled)
    return None if m is None else m["temp_mib"] + m["argument_mib"] + m["output_mib"] - m["alias_mib"]


def run_device(case: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import jaxlib

    devices = jax.devices()
    device = devices[0]
    try:
        platform_version = str(device.client.platform_version)
    except Exception:
        platform_version = None
    n = 512
    product = float(jnp.sum(jnp.ones((n, n), jnp.float32) @ jnp.ones((n, n), jnp.float32)))
    if product != n**3:
        raise RuntimeError(f"a {n}x{n} matmul of ones summed to {product}, not {n**3}")
    return {"platform": device.platform, "device_kind": device.device_kind, "count": len(devices),
            "local_count": jax.local_device_count(), "process_count": jax.process_count(),
            "devices": [str(d) for d in devices[:16]], "platform_version": platform_version,
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "memory": memory_figures()}


def _sizes(config: Any, case: dict[str, Any]) -> Any:
    config.data.patch_size = (case["patch"],) * 3
    config.model.base, config.model.depth = case["base"], case["depth"]
    config.model.dtype = case.get("dtype", "float32")
    config.train.batch_size = 1
    return config


def cmff_config(case: dict[str, Any]) -> Any:
    """``configs/cmff.py:<variant>`` at the case's sizes, random init (no CMFT run needed)."""
    from configs import cmff

    config = _sizes(cmff.get_config(case["variant"]), case)
    config.init.mode = "random"
    return config


def random_batch(patch: int, seed: int) -> dict[str, np.ndarray]:
    """One random ``(1, P, P, P, 4)`` image and ``(1, P, P, P)`` label in 0/1/2/4 (timing does not depend on it)."""
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((1, patch, patch, patch, IMAGE_CHANNELS), dtype=np.float32),
            "label": rng.choice(np.array(LABEL_VALUES, np.uint8), size=(1, patch, patch, patch))}


def time_train_step(step: Any, states: dict, batch: dict, repeats: int, loss_key: str) -> dict[str, Any]:
    """Cold compile of ``step`` on one device, then one warm-up call and ``repeats`` timed calls."""
    import jax

    from cmfl_jax import sharding

    mesh = sharding.make_mesh(jax.devices()[:1])
    states, batch = sharding.replicate(states, mesh), sharding.shard_batch(batch, mesh)
    step = step(mesh)
    rng = jax.random.key(SEED)
    t0 = time.perf_counter()
    compiled = step.lower(states, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    holder: dict[str, Any] = {"states": states}
    losses: list[float] = []

    def once():
        holder["states"], metrics = compiled(holder["states"], batch, rng)
        jax.block_until_ready(holder["states"])
        losses.append(float(metrics[loss_key]))

    timing = measure(once, repeats, 1)
    return {"compile_s": compile_s, "step_s": timing["median_s"], "timing": timing, "loss_key": loss_key,
            "loss_first": losses[0], "loss_last": losses[-1], "xla_mib": _xla_mib(compiled),
            "memory": memory_figures()}


def run_cmff_step(case: dict[str, Any]) -> dict[str, Any]:
    import jax

    from cmfl_jax.training.cmff_step import create_state, make_train_step

    config = cmff_config(case)
    states = {"seg": create_state(jax.random.key(SEED), config)}
    return time_train_step(lambda mesh: make_train_step(config, mesh), states, random_batch(case["patch"], SEED),
                           case["repeats"], "loss")


def run_cmft_step(case: dict[str, Any]) -> dict[str, Any]:
    import jax

    from cmfl_jax.training.cmft_step import create_states, make_train_step
    from configs import cmft

    config = _sizes(cmft.get_config(case["variant"]), case)
    states = create_states(jax.random.key(SEED), config)
    return time_train_step(lambda mesh: make_train_step(config, mesh), states, random_batch(case["patch"], SEED),
                           case["repeats"], "g_total")


def run_volume(case: dict[str, Any]) -> dict[str, Any]:
    """Seconds per subject of ``sliding_window`` over a random volume with the CMFF network's probabilities."""
    import jax
    import jax.numpy as jnp

    from cmfl_jax.inference.sliding_window import cmff_predict_fn, mirrored, sliding_window, window_starts
    from cmfl_jax.models import builder

    config = cmff_config(case)
    model = builder.cmff_net(config.model)
    params = builder.random_params(model, jax.random.key(SEED))
    window = (case["window"],) * 3
    fn = cmff_predict_fn(model, config.data.pairing)  # mirroring calls this one program once per flip
    t0 = time.perf_counter()
    compiled = fn.lower(params, jnp.zeros((1, *window, IMAGE_CHANNELS), jnp.float32)).compile()
    compile_s = time.perf_counter() - t0
    image = np.random.default_rng(SEED).standard_normal((*case["volume"], IMAGE_CHANNELS), dtype=np.float32)
    plain = lambda x: np.asarray(compiled(params, x))
    predict = mirrored(plain) if case["mirror"] else plain
    timing = measure(lambda: sliding_window(predict, image, window, OVERLAP, 1, "gaussian"), case["repeats"], 1)
    windows = math.prod(len(window_starts(max(s, case["window"]), case["window"], OVERLAP)) for s in case["volume"])
    return {"compile_s": compile_s, "s_per_subject": timing["median_s"], "timing": timing, "windows": windows,
            "xla_mib": _xla_mib(compiled), "memory": memory_figures()}


def run_short_run(case: dict[str, Any]) -> dict[str, Any]:
    """``steps`` CMFF steps on the data pipeline's patches; the mean loss of the first and last tenth."""
    import jax

    from cmfl_jax import sharding
    from cmfl_jax.data.dataset import load_entries
    from cmfl_jax.data.pipeline import patch_dataset
    from cmfl_jax.training.cmff_step import create_state, make_train_step
    from cmfl_jax.training.loop import device_batch

    config = cmff_config(case)
    config.data.root = case["data_root"]
    config.data.synthetic.n = case["subjects"]
    config.data.synthetic.shape = tuple(case["volume"])
    config.train.steps = case["steps"]
    config.cmff.lr, config.cmff.ce_weight = case["lr"], case["ce_weight"]
    t0 = time.perf_counter()
    entries = load_entries(config.data)
    data_s = time.perf_counter() - t0
    d = config.data
    patches = iter(patch_dataset(entries, d.patch_size, seed=SEED, batch_size=1, tumour_prob=d.tumour_prob))
    mesh = sharding.make_mesh(jax.devices()[:1])
    states = sharding.replicate({"seg": create_state(jax.random.key(SEED), config)}, mesh)
    to_batch = lambda b: sharding.shard_batch(device_batch(b, ("image", "label")), mesh)
    rng = jax.random.key(SEED)
    batch = to_batch(next(patches))
    t0 = time.perf_counter()
    step = make_train_step(config, mesh).lower(states, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    losses = []
    t0 = time.perf_counter()
    for i in range(case["steps"]):
        if i:
            batch = to_batch(next(patches))
        states, metrics = step(states, batch, rng)
        losses.append(float(metrics["loss"]))
    loop_s = time.perf_counter() - t0
    k = max(2, case["steps"] // 10)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    record = {"subjects": len(entries), "data_s": data_s, "compile_s": compile_s, "loop_s": loop_s,
              "step_s": loop_s / case["steps"], "mean_over": k, "loss_first": first, "loss_last": last,
              "losses": losses, "memory": memory_figures()}
    if not (math.isfinite(first) and math.isfinite(last) and last < first):
        record.update(status="failed", error=f"the loss did not fall: mean {first:.4g} over the first {k} steps, "
                                             f"{last:.4g} over the last {k}")
    return record


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "device": run_device, "cmff_step": run_cmff_step, "cmft_step": run_cmft_step, "volume": run_volume,
    "short_run": run_short_run}


def child_main(case_json: str) -> int:
    """One case in this process (compilation cache off: cold compiles); one result line on stdout."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    case = json.loads(case_json)
    try:
        record = {"status": "ok", **RUNNERS[case["section"]](case)}  # a runner may set its own failed status
    except Exception as e:
        traceback.print_exc()
        record = {"status": "failed", "error": _error_line(e)}
    print(RESULT_PREFIX + json.dumps(record), flush=True)
    return 0 if record["status"] == "ok" else 1


# --------------------------------------------------------------------------------------------------- parent side


def child_env(xla_flags: tuple[str, ...] = ()) -> dict[str, str]:
    """This environment with ``xla_flags`` added to ``XLA_FLAGS`` (a flag it sets already keeps its value)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags}
    env["XLA_FLAGS"] = " ".join([*flags, *(f for f in xla_flags if f.split("=")[0] not in names)])
    return env


def run_child(case: dict[str, Any], timeout: float, xla_flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run one case in ``python -m experiments.device_check --case``; a crash or a time-out is a failed record."""
    cmd = [sys.executable, "-m", "experiments.device_check", "--case", json.dumps(case)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(timeout, 1.0),
                              env=child_env(xla_flags))
    except subprocess.TimeoutExpired:
        return {**case, "status": "failed", "error": f"timed out after {timeout:.0f} s (the --minutes budget)",
                "wall_s": time.perf_counter() - t0}
    record = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            record = json.loads(line[len(RESULT_PREFIX):])
    if record is None:
        err = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        error = err[-1] if err else f"exit code {proc.returncode}"
        if proc.returncode < 0:
            error = f"killed by signal {-proc.returncode} (out of memory?): {error}"
        record = {"status": "failed", "error": error}
    return {**case, **record, "wall_s": time.perf_counter() - t0}


TEST_LINE = re.compile(r"^(tests/\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")


def parse_pytest(output: str) -> dict[str, Any]:
    """Counts and failed test ids from ``pytest -v`` output (complete or cut short)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed_ids = []
    for line in output.splitlines():
        m = TEST_LINE.match(line)
        if not m:
            continue
        outcome = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
                   "XFAIL": "skipped"}[m.group(2)]
        counts[outcome] += 1
        if outcome in ("failed", "errors"):
            failed_ids.append(m.group(1))
    finals = [line for line in output.splitlines() if line.startswith("=") and re.search(r" in [\d.]+s", line)]
    if finals:  # the run finished: its summary line is the authority (it also counts collection errors)
        found = {("errors" if k.startswith("error") else k): int(v) for v, k in SUMMARY_COUNT.findall(finals[-1])}
        counts = {"passed": found.get("passed", 0) + found.get("xpassed", 0), "failed": found.get("failed", 0),
                  "errors": found.get("errors", 0), "skipped": found.get("skipped", 0) + found.get("xfailed", 0)}
    return {**counts, "failed_ids": failed_ids[:10], "finished": bool(finals)}


def run_tests(files: list[str], timeout: float) -> dict[str, Any]:
    """pytest on ``files`` in a subprocess (one process, no xdist), stopped at ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:xdist", "-p", "no:cacheprovider", *files]
    env = dict(os.environ)
    for key, value in TEST_ENV.items():
        env.setdefault(key, value)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    parsed = parse_pytest(output)
    record = {"files": files, "seconds": seconds, "returncode": proc.returncode,
              "env": {k: env[k] for k in TEST_ENV}, **parsed}
    bad = parsed["failed"] + parsed["errors"]
    if timed_out:
        record["status"] = "failed" if bad else "incomplete"
        record["reason"] = (f"stopped at the --minutes budget after {seconds:.0f} s: {parsed['passed']} passed, "
                            f"{bad} failed so far")
        if bad:
            record["error"] = record["reason"]
    elif bad or proc.returncode != 0:
        record["status"] = "failed"
        tail = [line for line in output.splitlines() if line.strip()]
        first = ", ".join(parsed["failed_ids"][:3])
        record["error"] = (f"{parsed['failed']} failed, {parsed['errors']} errors: {first}" if bad
                           else f"pytest exit code {proc.returncode}: {tail[-1] if tail else ''}")
    else:
        record["status"] = "ok"
    return record


def section_cases(section: str, size: Size, args: argparse.Namespace) -> list[dict[str, Any]]:
    common = dict(section=section, variant=size.variant, patch=size.patch, base=size.base, depth=size.depth)
    if section == "device":
        return [dict(section="device")]
    if section in ("cmff_step", "cmft_step"):
        return [dict(dtype=dtype, repeats=size.timed_steps, **common) for dtype in size.dtypes]
    if section == "volume":
        return [dict(mirror=m, window=size.window, volume=list(size.volume), repeats=size.volume_repeats,
                     **{**common, "patch": size.window}) for m in (False, True)]
    if section == "short_run":
        return [dict(steps=args.run_steps or size.run_steps, lr=size.run_lr, ce_weight=size.run_ce_weight,
                     subjects=size.run_subjects, volume=list(size.volume), data_root=args.data_root or "", **common)]
    raise ValueError(section)


def section_status(cases: list[dict[str, Any]]) -> str:
    statuses = [c["status"] for c in cases]
    if "failed" in statuses:
        return "failed"
    return "ok" if "ok" in statuses else "skipped"


def describe(case: dict[str, Any]) -> str:
    if "dtype" in case:
        return f"{case['section']} {case['dtype']}"
    if "mirror" in case:
        return f"volume {'mirrored' if case['mirror'] else 'plain'}"
    return case["section"]


def progress_line(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"{record['status'].upper()}: {record.get('error') or record.get('reason')}"
    if record["section"] == "device":
        return f"{record['device_kind']} x{record['count']} ({record['platform']}), jax {record['jax']}"
    if "s_per_subject" in record:
        return f"{record['s_per_subject']:.3g} s per subject, compile {record['compile_s']:.3g} s"
    if record["section"] == "short_run":
        return f"loss {record['loss_first']:.4g} -> {record['loss_last']:.4g}, {record['step_s']:.3g} s per step"
    peak = record["memory"]["peak_mib"]
    return f"compile {record['compile_s']:.3g} s, step {record['step_s']:.3g} s, peak {peak:.0f} MiB"


# --------------------------------------------------------------------------------------------------- tables


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g} s"


def _mib(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"


def _peak_label(memory: dict[str, Any]) -> str:
    return "peak device memory" if memory["source"] == "device" else "peak process RSS"


def section_title(section: str, size: Size, payload: dict[str, Any]) -> str:
    p, b, d = size.patch, size.base, size.depth
    if section == "device":
        return "Device"
    if section == "cmff_step":
        return (f"CMFF train step: {p}³ patch, base {b}, depth {d}, batch 1 (S_A + S_B + fusion branch, mask-guided "
                "attention, Adam)")
    if section == "cmft_step":
        return f"CMFT train step: {p}³ patch, base {b}, depth {d}, batch 1 (G_AB, G_BA, D_A, D_B, each with Adam)"
    if section == "volume":
        v = "×".join(map(str, size.volume))
        return (f"Full-volume inference: {v} volume, {size.window}³ windows, 50 % overlap, Gaussian weighting, one "
                "window per call (CMFF network, float32)")
    if section == "short_run":
        run = payload["sections"].get("short_run", {}).get("cases", [{}])[0]
        steps = run.get("steps", size.run_steps)
        data = f"data root {run['data_root']}" if run.get("data_root") else (
            f"{size.run_subjects} synthetic subjects of {'×'.join(map(str, size.volume))}")
        return (f"Short CMFF run: {steps} steps, {p}³ patches from the data pipeline ({data}), base {b}, depth {d}, "
                f"batch 1, Adam {size.run_lr:g}, Dice + {size.run_ce_weight:g} × CE")
    return "Tests on this device"


def section_rows(section: str, entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, figure) rows of one section."""
    rows: list[tuple[str, str]] = []
    if section == "tests":
        if entry["status"] == "skipped":
            return [("skipped", entry.get("reason", ""))]
        rows += [("files", ", ".join(os.path.basename(f) for f in entry.get("files", [])))]
        if "passed" in entry:
            rows += [("passed / failed / errors / skipped",
                      f"{entry['passed']} / {entry['failed']} / {entry['errors']} / {entry['skipped']}"),
                     ("time", _s(entry["seconds"]))]
        if entry.get("failed_ids"):
            rows.append(("failed tests", ", ".join(entry["failed_ids"][:5])))
        if entry["status"] in ("failed", "incomplete"):
            rows.append((entry["status"].upper(), entry.get("error") or entry.get("reason", "")))
        return rows
    for case in entry.get("cases", []):
        label = describe(case).split(" ", 1)[1] + ": " if " " in describe(case) else ""
        if case["status"] == "skipped":
            rows.append((f"{label}skipped", case["reason"]))
            continue
        if case["status"] != "ok":
            rows.append((f"{label}FAILED", case.get("error", "")))
            if "memory" not in case:  # else it measured and then failed a check (a loss that did not fall)
                continue
        mem = case["memory"]
        if section == "device":
            rows += [("platform", case["platform"]), ("device kind", case["device_kind"]),
                     ("devices", f"{case['count']} in {case['process_count']} process"
                                 + ("es" if case["process_count"] > 1 else "")),
                     ("memory limit", _mib(mem["limit_mib"]) + (" (XLA allocator's bytes_limit)" if mem["source"] ==
                                                                "device" else " (machine RAM)")),
                     ("memory in use after start-up" + ("" if mem["source"] == "device" else " (process RSS)"),
                      _mib(mem["in_use_mib"])),
                     ("jax / jaxlib", f"{case['jax']} / {case['jaxlib']}")]
            if case.get("platform_version"):
                rows.append(("platform version", case["platform_version"]))
        elif section in ("cmff_step", "cmft_step"):
            rows += [(f"{label}compile", _s(case["compile_s"])),
                     (f"{label}step (median of {len(case['timing']['times_s'])})", _s(case["step_s"])),
                     (f"{label}{_peak_label(mem)}", _mib(mem["peak_mib"])),
                     (f"{label}XLA temp + args + out", _mib(case["xla_mib"]))]
        elif section == "volume":
            rows += [(f"{label}compile", _s(case["compile_s"])),
                     (f"{label}s per subject ({case['windows']} windows)", _s(case["s_per_subject"])),
                     (f"{label}{_peak_label(mem)}", _mib(mem["peak_mib"]))]
        elif section == "short_run":
            k = case["mean_over"]
            rows += [("data (generate / cache / load)", _s(case["data_s"])), ("compile", _s(case["compile_s"])),
                     (f"loss, mean of the first {k} steps", f"{case['loss_first']:.4g}"),
                     (f"loss, mean of the last {k} steps", f"{case['loss_last']:.4g}"),
                     ("time per step (data included)", _s(case["step_s"])),
                     (_peak_label(mem), _mib(mem["peak_mib"]))]
    return rows


def device_label(payload: dict[str, Any]) -> str:
    dev = payload.get("device") or {}
    if not dev:
        return "unknown"
    label = dev["device_kind"] if dev["platform"] != "cpu" else "cpu"
    return f"{label} ×{dev['count']}" if dev["count"] > 1 else label


def markdown(payload: dict[str, Any]) -> str:
    size = SIZES[payload["size"]]
    label = device_label(payload)
    lines = [f"# Device check: {label}, --size {payload['size']}", "",
             f"`python -m experiments.device_check {' '.join(payload['argv'])}` ({payload['started']}, "
             f"{payload['total_s']:.0f} s of a {payload['minutes']:g}-minute budget; "
             f"failed sections: {', '.join(payload['failed']) or 'none'})"]
    if payload.get("xla_flags"):
        lines.append(f"\nXLA_FLAGS of the measured cases: `{payload['xla_flags']}`")
    for section in SECTIONS:
        entry = payload["sections"].get(section)
        if entry is None:
            continue
        lines += ["", f"## {section_title(section, size, payload)}", "", "| device | what | figure |", "|---|---|---|"]
        lines += [f"| {label} | {what} | {figure} |" for what, figure in section_rows(section, entry)]
    return "\n".join(lines) + "\n"


def write_outputs(out: str, payload: dict[str, Any]) -> str:
    """``device_check.json`` and ``device_check.md`` in ``out`` (each written whole, then renamed); the Markdown."""
    write_json(os.path.join(out, "device_check.json"), payload)
    text = markdown(payload)
    path = os.path.join(out, "device_check.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return text

# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: the paper's 128^3, base 16, depth 4 (GPU/TPU); smoke: tiny, for CPU and CI")
    parser.add_argument("--out", help="folder of device_check.json and .md (default "
                                      "experiments/results/device_check/<platform>)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the device-relevant tests")
    parser.add_argument("--minutes", type=float, help="time budget (default: 7.5 for full, 10 for smoke)")
    parser.add_argument("--tests", nargs="+", help=f"test files to run (default: those of {DEVICE_TESTS} that exist)")
    parser.add_argument("--data-root", help="short run on this BraTS folder instead of the built-in synthetic data")
    parser.add_argument("--run-steps", type=int, help="steps of the short run (default: 200 for full, 10 for smoke)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case (JSON) in this process
    args = parser.parse_args(argv)
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.run_steps is not None and args.run_steps < 2:
        parser.error("--run-steps must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case is not None:
        return child_main(args.case)
    size = SIZES[args.size]
    minutes = args.minutes or size.minutes
    t_start = time.perf_counter()
    deadline = t_start + 60 * minutes
    payload: dict[str, Any] = {
        "size": args.size, "minutes": minutes,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "xla_flags": child_env(size.xla_flags)["XLA_FLAGS"],  # of the measured cases
        "device": None, "sections": {}, "failed": [], "total_s": 0.0,
    }
    out = args.out

    for section in SECTIONS:
        t0 = time.perf_counter()
        if section == "tests":
            entry = tests_section(args, size, deadline)
        else:
            cases = []
            for case in section_cases(section, size, args):
                left = deadline - time.perf_counter()
                if left < size.needs[section]:
                    record = {**case, "status": "skipped",
                              "reason": f"needs ~{size.needs[section]:.0f} s, {max(left, 0):.0f} s left of the "
                                        f"{minutes:g}-minute budget (--minutes)"}
                else:
                    print(f"[{section}] {describe(case)} ...", flush=True)
                    record = run_child(case, left, size.xla_flags)
                cases.append(record)
                print(f"[{section}] {describe(case)}: {progress_line(record)}", flush=True)
                if section == "device" and record["status"] == "ok":
                    payload["device"] = {k: record[k] for k in ("platform", "device_kind", "count", "jax", "jaxlib")}
                if out is not None:  # after every case: a run cut short keeps what it measured
                    payload["sections"][section] = {"status": section_status(cases), "cases": cases}
                    payload["total_s"] = time.perf_counter() - t_start
                    write_outputs(out, payload)
            entry = {"status": section_status(cases), "cases": cases}
        entry["seconds"] = time.perf_counter() - t0
        payload["sections"][section] = entry
        if entry["status"] == "failed":
            payload["failed"].append(section)
        if out is None:  # known once the device section has run
            where = payload["device"]["platform"] if payload["device"] else "unknown"
            out = os.path.join(REPO, "experiments", "results", "device_check", where)
        payload["total_s"] = time.perf_counter() - t_start
        text = write_outputs(out, payload)
    print()
    print(text)
    print(f"wrote {os.path.join(out, 'device_check.json')} and {os.path.join(out, 'device_check.md')}")
    return 1 if payload["failed"] else 0


def tests_section(args: argparse.Namespace, size: Size, deadline: float) -> dict[str, Any]:
    if args.skip_tests:
        print("[tests] skipped (--skip-tests)", flush=True)
        return {"status": "skipped", "reason": "--skip-tests"}
    wanted = list(args.tests or DEVICE_TESTS)
    files = [f for f in wanted if os.path.isfile(os.path.join(REPO, f))]
    missing = [f for f in wanted if f not in files]
    if not files:
        return {"status": "skipped", "reason": f"none of these test files exists: {', '.join(wanted)}"}
    left = deadline - time.perf_counter()
    if left < size.needs["tests"]:
        return {"status": "skipped", "files": files,
                "reason": f"needs ~{size.needs['tests']:.0f} s, {max(left, 0):.0f} s left of the budget (--minutes)"}
    print(f"[tests] pytest {' '.join(files)} ...", flush=True)
    record = {**run_tests(files, left), "missing": missing}
    print(f"[tests] {record['status']}: {record['passed']} passed, {record['failed']} failed, "
          f"{record['errors']} errors in {record['seconds']:.0f} s", flush=True)
    return record


if __name__ == "__main__":
    sys.exit(main())
