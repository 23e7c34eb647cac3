"""Which XLA CPU options are fastest for each jitted function: the measurement behind
``cmfl_jax.compiler_options.CPU_OPTIONS``.

For each function it compiles one executable per candidate option set (``jax.jit(f, compiler_options=...)``)
and times them in turn, ``--rounds`` rounds of one call each after a warm-up call, so that the machine's
other load falls on every candidate alike. Reported: the median seconds per call and its ratio to XLA's
defaults (below 1: faster), and the largest difference of the outputs from the defaults' (float rounding).

Functions, at the sizes a CPU user trains and predicts with:

* ``cmft_step``: the CMFT step of ``configs/cmft.py:cpu64`` (the paper's U-Net, base 16, depth 4, 64^3);
* ``cmff_step``: the CMFF step of ``configs/cmff.py:cpu`` (base 8, depth 3, 64^3, Dice + CE);
* ``unet_step``: the benchmark's U-Net train step (base 16, depth 4, 64^3; ``experiments/benchmark.py``);
* ``window``: the CMFF network's probabilities on one 128^3 window (base 16, depth 4), what ``predict`` runs.

    .venv/bin/python -m experiments.xla_options [--functions cmft_step ...] [--rounds 5]
        [--out experiments/results/xla_options.json]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULT_OUT = os.path.join("experiments", "results", "xla_options.json")
CANDIDATES = {
    "defaults": {},
    "no YNNPACK": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "YNNPACK dots only": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}
SEED = 0


def _config(path: str, variant: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_cfg_{os.path.basename(path)[:-3]}", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _patch_batch(config, with_label: bool) -> dict:
    import jax.numpy as jnp

    rng = np.random.default_rng(SEED)
    size = tuple(config.data.patch_size)
    batch = {"image": jnp.asarray(rng.standard_normal((1, *size, 4), dtype=np.float32))}
    if with_label:
        batch["label"] = jnp.asarray(rng.choice(np.array([0, 1, 2, 4], np.uint8), (1, *size)))
    return batch


def cmft_step():
    """(function, args) of the CMFT step at ``configs/cmft.py:cpu64``."""
    import jax

    from cmfl_jax.training import cmft_step as m

    config = _config("configs/cmft.py", "cpu64")
    c = config.cmft
    step = functools.partial(m.train_step, pairing=config.data.pairing, objective=c.objective,
                             lambda_cycle=c.lambda_cycle, identity_weight=c.identity_weight)
    return step, (m.create_states(jax.random.key(SEED), config), _patch_batch(config, False), jax.random.key(1))


def cmff_step():
    """(function, args) of the CMFF step at ``configs/cmff.py:cpu`` (random init)."""
    import jax

    from cmfl_jax.training import cmff_step as m

    config = _config("configs/cmff.py", "cpu")
    config.init.mode = "random"
    step = functools.partial(m.train_step, pairing=config.data.pairing, ce_weight=config.cmff.ce_weight,
                             output=config.model.output)
    states = {"seg": m.create_state(jax.random.key(SEED), config)}
    return step, (states, _patch_batch(config, True), jax.random.key(1))


def unet_step():
    """(function, args) of the benchmark's U-Net train step at 64^3."""
    from experiments.benchmark import unet_functions

    case = {"size": 64, "base": 16, "depth": 4, "impl": "cpu_fast", "dtype": "float32", "seed": SEED}
    state, x, y, train_step, _ = unet_functions(case)
    return train_step, (state, x, y)


def window():
    """(function, args) of the CMFF network's probabilities on one 128^3 window (the paper's network)."""
    import jax
    import jax.numpy as jnp

    from cmfl_jax.data.pairs import split_pairs
    from cmfl_jax.models import builder

    config = _config("configs/cmff.py", "full")
    model = builder.cmff_net(config.model)
    params = builder.random_params(model, jax.random.key(SEED))

    def probs(params, x):
        a, b = split_pairs(x, config.data.pairing)
        return model.apply({"params": params}, a, b)["probs"]

    x = jnp.asarray(np.random.default_rng(SEED).standard_normal((1, 128, 128, 128, 4), dtype=np.float32))
    return probs, (params, x)


FUNCTIONS = {"cmft_step": cmft_step, "cmff_step": cmff_step, "unet_step": unet_step, "window": window}


def measure(name: str, rounds: int) -> dict:
    """Compile ``name`` once per candidate, then time the candidates in turn; the record of the function."""
    import jax

    fn, args = FUNCTIONS[name]()
    compiled, compile_s = {}, {}
    for label, options in CANDIDATES.items():
        t0 = time.perf_counter()
        compiled[label] = jax.jit(fn, compiler_options=options or None).lower(*args).compile()
        compile_s[label] = time.perf_counter() - t0
        print(f"[xla_options] {name} {label}: compiled in {compile_s[label]:.1f} s", flush=True)
    outputs = {label: jax.block_until_ready(c(*args)) for label, c in compiled.items()}  # warm-up calls
    reference = jax.tree.leaves(outputs["defaults"])
    times: dict[str, list[float]] = {label: [] for label in compiled}
    for _ in range(rounds):
        for label, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[label].append(time.perf_counter() - t0)
    rows = {}
    for label in compiled:
        diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                   for a, b in zip(jax.tree.leaves(outputs[label]), reference, strict=True)
                   if np.issubdtype(np.asarray(a).dtype, np.floating))
        rows[label] = {"options": CANDIDATES[label], "compile_s": compile_s[label], "times_s": times[label],
                       "median_s": statistics.median(times[label]), "max_abs_diff": diff}
    base = rows["defaults"]["median_s"]
    for row in rows.values():
        row["ratio"] = row["median_s"] / base
    best = min(rows, key=lambda label: rows[label]["median_s"])
    print(f"[xla_options] {name}: " + ", ".join(f"{k} {v['median_s']:.3f} s" for k, v in rows.items()), flush=True)
    return {"function": name, "rows": rows, "fastest": best}


def markdown(records: list[dict]) -> str:
    lines = ["| function | options | median s per call | / defaults | compile s | max abs diff | fastest |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in records:
        for label, row in r["rows"].items():
            fastest = "yes" if label == r["fastest"] else ""
            lines.append(f"| `{r['function']}` | {label} | {row['median_s']:.3f} | {row['ratio']:.2f} | "
                         f"{row['compile_s']:.1f} | {row['max_abs_diff']:.2g} | {fastest} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--functions", nargs="+", default=list(FUNCTIONS), choices=list(FUNCTIONS))
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per candidate (in turn)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import jax

    if jax.default_backend() != "cpu":
        print(f"[xla_options] the options are for the CPU backend; JAX uses {jax.default_backend()}", file=sys.stderr)
        return 2
    records = [measure(name, args.rounds) for name in args.functions]
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    command = " ".join(["python -m experiments.xla_options", *(argv if argv is not None else sys.argv[1:])])
    table = markdown(records)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                          "load_average_at_end": load}, "records": records}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"XLA CPU options per jitted function, {os.cpu_count()} CPUs, jax {jax.__version__} (load average "
                f"{' '.join(load)} at the end); `{command}`\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
