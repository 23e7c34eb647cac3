"""The experiments' one harness: every case in a fresh process that prints one JSON line (its compiles cold: JAX's
persistent cache off; its peak memory its own), the machine's description, and JSON and Markdown outputs rewritten
after every case. A client module keeps ``RUNNERS`` (case ``kind`` -> function of the case returning its figures,
called in the child ``python -m experiments.harness MODULE CASE``) and hands its cases to :func:`run_cases`.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "HARNESS_RESULT "


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def current_rss_mib() -> float:
    """Resident set size now, MiB (``/proc``; the peak so far where there is no ``/proc``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def measure(call: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Time ``warmup`` untimed calls (the first one's time kept), then ``repeats`` calls; ``call`` must block."""
    times = []
    for _ in range(warmup + repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    first, times = (times[0] if warmup else None), times[warmup:]
    return {"first_s": first, "median_s": statistics.median(times) if times else None,
            "min_s": min(times) if times else None, "times_s": times}


def memory_analysis(compiled: Any) -> dict[str, float] | None:
    """XLA's own buffer sizes of a compiled function, MiB (None where the backend does not say); ``total_mib``:
    temp + argument + output - aliased (donated) bytes."""
    try:
        analysis = compiled.memory_analysis()
        fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")
        m = {f.replace("_size_in_bytes", "_mib"): getattr(analysis, f) / 2**20 for f in fields}
    except Exception:
        return None
    return {**m, "total_mib": m["temp_mib"] + m["argument_mib"] + m["output_mib"] - m["alias_mib"]}


def memory_figures() -> dict[str, Any]:
    """Peak and limit of the default device's memory (``memory_stats``), else the process RSS and machine RAM."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
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


def run_case(runners: dict[str, Callable[[dict], dict]], case: dict[str, Any]) -> dict[str, Any]:
    """One case in this process: its fields, ``status`` and the runner's figures (a runner may fail its own case),
    or ``status`` failed and the one-line ``error``."""
    try:
        return {**case, "status": "ok", **runners[case["kind"]](case)}
    except Exception as e:
        traceback.print_exc()
        return {**case, "status": "failed", "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"}


def child_env(xla_flags: Iterable[str] = (), env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this one) with the compilation cache off and ``xla_flags`` added to ``XLA_FLAGS`` (a flag
    it sets already keeps its value)."""
    env = dict(os.environ if env is None else env)
    flags = env.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags}
    env["XLA_FLAGS"] = " ".join([*flags, *(f for f in xla_flags if f.split("=")[0] not in names)])
    return {**env, "JAX_ENABLE_COMPILATION_CACHE": "false"}


def run_case_subprocess(module: str, case: dict[str, Any], timeout: float,
                        env: dict[str, str] | None = None) -> dict[str, Any]:
    """``case`` run by ``module``'s ``RUNNERS`` in a fresh process; a crash or a time-out is a failed record."""
    cmd = [sys.executable, "-m", "experiments.harness", module, json.dumps(case)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(timeout, 1.0),
                              env=child_env(env=env))
    except subprocess.TimeoutExpired:
        return {**case, "status": "failed", "error": f"timed out after {timeout:.0f} s", "wall_s": timeout}
    lines = [line[len(RESULT_PREFIX):] for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if lines:
        record = json.loads(lines[-1])
    else:
        err = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        error = err[-1] if err else f"exit code {proc.returncode}"
        if proc.returncode < 0:
            error = f"killed by signal {-proc.returncode} (out of memory?): {error}"
        record = {**case, "status": "failed", "error": error}
    return {**record, "wall_s": time.perf_counter() - t0}


def describe(case: dict[str, Any]) -> str:
    """A case in a progress line: its section (or kind) and the fields that tell it from the others."""
    fields = ("job", "size", "impl", "dtype", "devices", "mirror", "augment", "where", "workers")
    return " ".join([case.get("section", case["kind"]), *(f"{k}={case[k]}" for k in fields if k in case)])


def summary(record: dict[str, Any]) -> str:
    """A finished case in a progress line: its main timings and peak memory."""
    parts = [f"{k} {record[k]['median_s']:.3g} s" for k in ("train", "forward", "volume")
             if isinstance(record.get(k), dict) and record[k]["median_s"] is not None]
    parts += [f"compile {record[k]:.3g} s" for k in ("compile_train_s", "compile_s") if record.get(k)]
    parts += [f"{record[k]:.4g} {k.replace('_per_s', '/s')}" for k in ("patches_per_s", "flops") if record.get(k)]
    parts += [f"peak {record['peak_rss_mib']:.0f} MiB"] if "peak_rss_mib" in record else []
    return ", ".join([*parts, f"case {record.get('wall_s', 0):.0f} s"])


def run_cases(module: str, cases: list[dict[str, Any]], save: Callable[[list[dict]], None], *,
              timeout: Callable[[dict], float], skip: Callable[[dict], str | None] = lambda case: None,
              env: Callable[[dict], dict[str, str] | None] = lambda case: None) -> list[dict[str, Any]]:
    """Each case in its own process (or skipped with ``skip``'s reason), a progress line before and after it,
    ``save`` of the records so far after every case."""
    records: list[dict[str, Any]] = []
    for i, case in enumerate(cases, 1):
        label = f"[{i}/{len(cases)}] {describe(case)}"
        reason = skip(case)
        if reason:
            record = {**case, "status": "skipped", "reason": reason}
        else:
            print(f"{label} ...", flush=True)
            record = run_case_subprocess(module, case, timeout(case), env(case))
        records.append(record)
        line = summary(record) if record["status"] == "ok" else (
            f"{record['status'].upper()}: {record.get('error') or record.get('reason')}")
        print(f"{label}: {line}", flush=True)
        save(records)
    return records


def run_suite(module: str, argv: list[str] | None, cases: list[dict[str, Any]], out: str,
              make_table: Callable[[list[dict]], str], machine: dict[str, Any], payload: dict[str, Any],
              annotate: Callable[[list[dict]], dict] = lambda records: {}, **run: Any) -> list[dict[str, Any]]:
    """:func:`run_cases`, the records in ``out`` (with ``payload``'s fields and ``annotate``'s) and their table next
    to it (``.md``, under the command line and the machine), after every case."""
    payload = {**payload, "started": now(), "argv": sys.argv[1:] if argv is None else argv, "machine": machine}
    head = f"`{command(module, argv)}` ({payload['started']}, {describe_machine(machine)})"

    def save(records: list[dict[str, Any]]) -> None:
        payload.update(records=records, **annotate(records))
        write_outputs(out, payload, f"{head}\n\n{make_table(records)}\n")

    records = run_cases(module, cases, save, **run)
    print(f"\n{make_table(records)}\n\nwrote {out} and {os.path.splitext(out)[0]}.md")
    return records


def machine_info(**extra: Any) -> dict[str, Any]:
    """What the numbers depend on: CPU, core count, library versions (without starting JAX's backend)."""
    def read(path: str, parse: Callable[[str], Any]) -> Any:
        try:
            with open(path) as f:
                return parse(f.read())
        except (OSError, StopIteration):
            return None

    cpu_model = read("/proc/cpuinfo", lambda text: next(line.split(":", 1)[1].strip() for line in text.splitlines()
                                                         if line.startswith("model name")))
    versions = {name: metadata.version(name) for name in ("jax", "jaxlib")}
    return {"processor": platform.processor(), "cpu_model": cpu_model, "machine": platform.machine(),
            "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average": read("/proc/loadavg", lambda text: text.split()[:3]), **versions, **extra}


def describe_machine(machine: dict[str, Any]) -> str:
    return (f"{machine['cpu_model'] or machine['processor']}, {machine['cpus_usable']} cpus, "
            f"jax {machine['jax']}")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def command(module: str, argv: list[str] | None) -> str:
    return f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)


def write_outputs(json_path: str, payload: dict[str, Any], markdown: str) -> None:
    """``json_path`` and the Markdown next to it (``.md``), each written whole, then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    for path, text in ((json_path, json.dumps(payload, indent=1)), (os.path.splitext(json_path)[0] + ".md", markdown)):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def num(value: float | None, fmt: str = ".3g") -> str:
    return "-" if value is None else format(value, fmt)


def table(head: list[str], rows: Iterable[list[str]], align: str = "---") -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + f"{align}|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


if __name__ == "__main__":  # the per-case process: one JSON result line on stdout
    result = run_case(importlib.import_module(sys.argv[1]).RUNNERS, json.loads(sys.argv[2]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    sys.exit(0 if result["status"] == "ok" else 1)
