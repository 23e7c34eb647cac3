"""Where a CPU train step's time goes: the sampler's parts (tumour index, centre, image and label windows), the
float16 -> float32 cast, the batch's trip to the device, grain's read-ahead, and the jitted step, on ``--data`` and on
the built-in synthetic set at BraTS size in one process and one compile, the two interleaved in blocks of steps:
on a shared machine the ratios hold where the absolute times drift.

    python -m experiments.benchmark --suite step_split --data ../shared/data/brats18_train [--steps 24]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from experiments import harness, programs
from experiments.harness import num, table

CONFIG = "configs/cmff.py:cpu"
SYNTHETIC = {"data.root": "", "data.synthetic.shape": [240, 240, 155], "data.synthetic.n": 12}  # BraTS-sized
PARTS = ("tumour_index", "centre", "image_window", "label_open", "label_window", "host_cast", "sampler", "to_device",
         "wait_for_batch", "step")
BLOCKS = 4  # the data sets take turns, this many blocks each


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=24, help="step_split suite: train steps per data set")


def split_cases(args: argparse.Namespace, with_torch: bool = False) -> list[dict[str, Any]]:
    sets = {"data": {"data.root": args.data}} if args.data else {}
    return [dict(kind="step_split", config=CONFIG, steps=args.steps, seed=args.seed,
                 sets={**sets, "synthetic": SYNTHETIC})]


def sampler_parts(entry: Any, sampler: Any, rng: np.random.Generator) -> dict[str, float]:
    """One patch cut as ``PatchSampler.random_map`` cuts it (augmentation off), each part timed."""
    from cmfl_jax.data.pipeline import crop_centered

    marks = [time.perf_counter()]
    tumour = entry.tumour_index()
    marks.append(time.perf_counter())
    centre = np.array(np.unravel_index(int(tumour[rng.integers(len(tumour))]), entry.shape))
    marks.append(time.perf_counter())
    image = crop_centered(entry.stored_image(), centre, sampler.patch_size)
    marks.append(time.perf_counter())
    label = entry.label()
    marks.append(time.perf_counter())
    crop_centered(label, centre, sampler.patch_size)
    marks.append(time.perf_counter())
    image.astype(np.float32)
    marks.append(time.perf_counter())
    sampler.random_map((0, entry), rng)
    marks.append(time.perf_counter())
    return dict(zip(PARTS[:7], np.diff(marks), strict=True))


def run_split(case: dict[str, Any]) -> dict[str, Any]:
    """Per data set: the median of each part (s), the step's CPU seconds (every thread), grain's read-ahead (MiB)."""
    import jax
    from absl import flags

    from cmfl_jax import sharding
    from cmfl_jax.data.dataset import load_entries
    from cmfl_jax.data.pipeline import PatchSampler
    from cmfl_jax.training.loop import device_batch, to_device, training_patches

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    configs = {name: programs.load_config(case["config"], {"init.mode": "random", **o}) for name, o in
               case["sets"].items()}
    entries = {name: load_entries(c.data) for name, c in configs.items()}
    times: dict[str, dict[str, list[float]]] = {name: {p: [] for p in (*PARTS, "step_cpu")} for name in configs}
    rng = np.random.default_rng(case["seed"])
    for name, config in configs.items():
        sampler = PatchSampler(config.data.patch_size)
        for i in range(case["steps"]):
            for part, s in sampler_parts(entries[name][i % len(entries[name])], sampler, rng).items():
                times[name][part].append(s)
    mesh = sharding.make_mesh(jax.devices()[:1])
    first = next(iter(configs.values()))
    step, states, _ = programs.job_step(first, mesh)
    iterators, read_ahead = {}, {}
    for name, config in configs.items():
        rss = harness.current_rss_mib()
        iterators[name] = iter(training_patches(config, entries[name]))
        batch = to_device(device_batch(next(iterators[name]), ("image", "label")), mesh)
        time.sleep(2.0)  # what grain cuts ahead meanwhile stays in memory
        read_ahead[name] = harness.current_rss_mib() - rss
    t0 = time.perf_counter()
    step = step.lower(states, batch).compile()
    compile_s = time.perf_counter() - t0
    per_block = max(1, case["steps"] // BLOCKS)
    for _ in range(BLOCKS):
        for name, iterator in iterators.items():
            for _ in range(per_block):
                marks = [time.perf_counter()]
                host = next(iterator)
                marks.append(time.perf_counter())
                batch = jax.block_until_ready(to_device(device_batch(host, ("image", "label")), mesh))
                marks.append(time.perf_counter())
                cpu = time.process_time()
                states, metrics = step(states, batch)
                jax.block_until_ready(metrics)
                marks.append(time.perf_counter())
                times[name]["step_cpu"].append(time.process_time() - cpu)
                for part, s in zip(("wait_for_batch", "to_device", "step"), np.diff(marks), strict=True):
                    times[name][part].append(s)
    for iterator in iterators.values():
        if hasattr(iterator, "close"):
            iterator.close()
    return {"compile_s": compile_s, "read_ahead_mib": read_ahead, "subjects": {n: len(e) for n, e in entries.items()},
            "median_s": {n: {p: float(np.median(v)) for p, v in t.items()} for n, t in times.items()},
            "times_s": times, "steps_run": BLOCKS * per_block, "peak_rss_mib": harness.peak_rss_mib()}


RUNNERS = {"step_split": run_split}
LABELS = {"tumour_index": "tumour index (np.load, memory map)", "centre": "centre draw",
          "image_window": "image window (float16 memory map)", "label_open": "label open (blosc2)",
          "label_window": "label window (blosc2 decompression)", "host_cast": "float16 -> float32 on the host (not "
          "done: for scale)", "sampler": "the whole sampler (random_map)", "to_device": "batch to the device + cast",
          "wait_for_batch": "loop waits on the pipeline (next)", "step": "jitted train step (wall)",
          "step_cpu": "jitted train step (CPU s, all threads)"}


def split_table(records: list[dict[str, Any]]) -> str:
    """Per part: median ms and share of the step per data set, and the ratio of the first set to the synthetic."""
    parts = []
    for r in records:
        if r["status"] != "ok":
            parts.append(f"FAILED: {r.get('error')}")
            continue
        m, names = r["median_s"], list(r["median_s"])
        head = ["part", *(f"{n} ms" for n in names), *(f"{n} / step" for n in names), f"{names[0]} / {names[-1]}"]
        rows = [[LABELS[p], *(num(1e3 * m[n][p]) for n in names), *(f"{m[n][p] / m[n]['step']:.2%}" for n in names),
                 num(m[names[0]][p] / m[names[-1]][p], ".2f") if m[names[-1]][p] else "-"] for p in LABELS]
        rows.append(["grain read-ahead (RSS after 1 batch + 2 s, MiB)", *(f"{r['read_ahead_mib'][n]:.0f}"
                                                                          for n in names), *[""] * (len(names) + 1)])
        parts += [f"`{r['config']}`, {r['steps_run']} steps per data set in {BLOCKS} interleaved blocks, subjects "
                  + ", ".join(f"{n}: {k}" for n, k in r["subjects"].items()) + f"; compile {r['compile_s']:.0f} s:",
                  "", table(head, rows), "", "Sampler parts: one patch at a time, in this process; the sampler runs "
                  "them in grain's threads while the previous step runs, so only 'loop waits' adds to a step."]
    return "\n".join(parts)
