"""Which XLA CPU options are fastest for each jitted function: one process per function (``experiments/harness.py``)
compiles it once per option set of ``CANDIDATES`` and times them in turn, ``--rounds`` rounds of one call each
after a warm-up, so that the machine's other load falls on every candidate alike. Reported: the median seconds per
call, its ratio to XLA's defaults (below 1: faster), the compile time and the largest difference of the outputs from
the defaults' (float rounding). Functions: the CMFT step of ``configs/cmft.py:cpu64``, the CMFF step of
``configs/cmff.py:cpu``, the benchmark's U-Net step at 64^3 and the paper's CMFF network on one 128^3 window
(``configs/cmff.py:full``). The recorded runs are in docs/performance.md.

    .venv/bin/python -m experiments.xla_options [--functions cmft_step ...] [--rounds 5]
        [--out experiments/results/xla_options.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from experiments import harness, programs
from experiments.harness import table

CANDIDATES = {  # option sets, each compiled per function (compiler_options)
    "defaults": {},
    "no YNNPACK": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "YNNPACK dots only": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}
FUNCTIONS = {"cmft_step": ("configs/cmft.py:cpu64", {}),  # the config and overrides of each, or None: the U-Net
                 "cmff_step": ("configs/cmff.py:cpu", {"init.mode": "random"}), "unet_step": None,
                 "window": ("configs/cmff.py:full", {})}


def program(name: str) -> tuple[Any, tuple]:
    """(jitted function, fresh arguments) of a function: a job's step at a CPU size, the U-Net step at 64^3, or
    the paper's CMFF network on one window (128^3)."""
    import jax
    import jax.numpy as jnp

    from cmfl_jax import sharding

    if name == "unet_step":
        case = dict(size=64, base=16, depth=4, impl="cpu_fast", dtype="float32", seed=programs.SEED)
        state, x, y, train_step, _ = programs.unet_functions(case)
        return jax.jit(train_step, donate_argnums=0), (state, x, y)
    spec, overrides = FUNCTIONS[name]
    config = programs.load_config(spec, overrides)
    if name == "window":  # one window of the config's patch size
        fn, params, channels = programs.volume_program(dict(net="cmff", config=spec, overrides=overrides))
        return fn, (params, jnp.asarray(programs.random_batch(1, tuple(config.data.patch_size), channels)["image"]))
    step, states, batch = programs.job_step(config, sharding.make_mesh(jax.devices()[:1]))
    return step, (states, batch, jax.random.key(1))


def run_function(case: dict[str, Any]) -> dict[str, Any]:
    """One function compiled with each candidate's options, then timed in turn (``rounds`` rounds of one call each
    after a warm-up), so that the machine's other load falls on every candidate alike; the largest difference of
    its outputs from the defaults' (float rounding)."""
    import jax

    if jax.default_backend() != "cpu":
        raise RuntimeError(f"the options are for the CPU backend; JAX uses {jax.default_backend()}")
    donated = case["function"] != "window"  # a step's states are donated: each call takes the last one's
    compiled, compile_s, args, times = {}, {}, {}, {}
    for label, options in CANDIDATES.items():
        fn, args[label] = program(case["function"])
        t0 = time.perf_counter()
        compiled[label] = fn.lower(*args[label]).compile(compiler_options=options or None)
        compile_s[label], times[label] = time.perf_counter() - t0, []

    def call(label: str) -> Any:
        out = jax.block_until_ready(compiled[label](*args[label]))
        args[label] = (out[0], *args[label][1:]) if donated else args[label]
        return jax.tree.leaves(out)

    outputs = {label: [np.asarray(a, np.float64) for a in call(label) if np.issubdtype(a.dtype, np.floating)]
               for label in compiled}  # the warm-up: every candidate on the same arguments
    for _ in range(case["rounds"]):
        for label in compiled:
            t0 = time.perf_counter()
            call(label)
            times[label].append(time.perf_counter() - t0)
    rows = {label: {"options": CANDIDATES[label], "compile_s": compile_s[label], "times_s": times[label],
                    "median_s": statistics.median(times[label]), "max_abs_diff": max(
                        float(np.max(np.abs(a - b))) for a, b in zip(outputs[label], outputs["defaults"], strict=True))}
            for label in compiled}
    for row in rows.values():
        row["ratio"] = row["median_s"] / rows["defaults"]["median_s"]
    return {"rows": rows, "fastest": min(rows, key=lambda label: rows[label]["median_s"])}


def markdown(records: list[dict[str, Any]]) -> str:
    """The xla suite: per function and candidate options, seconds per call and the ratio to XLA's defaults."""
    rows = [[f"`{r['function']}`", label, f"{row['median_s']:.3f}", f"{row['ratio']:.2f}", f"{row['compile_s']:.1f}",
             f"{row['max_abs_diff']:.2g}", "yes" if label == r["fastest"] else ""]
            for r in records if r["status"] == "ok" for label, row in r["rows"].items()]
    rows += [[f"`{r['function']}`", "FAILED: " + r.get("error", "")[:60]] + ["-"] * 5
             for r in records if r["status"] != "ok"]
    return table(["function", "options", "median s per call", "/ defaults", "compile s", "max abs diff", "fastest"],
                 rows)


RUNNERS = {"xla": run_function}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--functions", nargs="+", default=list(FUNCTIONS), choices=list(FUNCTIONS))
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per candidate (in turn)")
    parser.add_argument("--case-timeout", type=float, default=3600.0, help="seconds before a case counts as failed")
    parser.add_argument("--out", default=os.path.join("experiments", "results", "xla_options.json"))
    args = parser.parse_args(argv)
    cases = [dict(kind="xla", function=name, rounds=args.rounds) for name in args.functions]
    harness.run_suite("experiments.xla_options", argv, cases, args.out, markdown, harness.machine_info(), {},
                      timeout=lambda case: args.case_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
