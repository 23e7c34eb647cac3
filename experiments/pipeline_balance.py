"""Can the input pipeline feed an accelerator? ``python -m experiments.benchmark --suite pipeline`` measures the
patches per second the training loop's own pipeline (``training_patches``: the cache, the sampler, grain's workers)
delivers here, counts the train steps' FLOPs with XLA's cost analysis, and sets the two against the steps per second
a T4, an A100 and an H100 would run at their published peaks and a stated efficiency. ``experiments/device_check.py``
measures the same balance on a real accelerator.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from experiments import harness, programs
from experiments.harness import num, table

# Dense tensor-core peaks (no sparsity) of NVIDIA's datasheets: T4 "Mixed Precision (FP16/FP32) 65 TFLOPS"; A100
# "BFLOAT16 Tensor Core 312 TFLOPS" (624 with sparsity); H100 SXM "BF16 Tensor Core 1,979 teraFLOPS" with sparsity,
# half of it dense. The T4 has no bfloat16: it trains in float16.
GPUS = (("T4", "float16", 65e12), ("A100", "bfloat16", 312e12), ("H100 SXM", "bfloat16", 989e12))
EFFICIENCIES = (0.3, 0.5)  # the share of the peak a 3D U-Net step is assumed to reach
JOBS = ("cmff", "cmft")
PEAKS_NOTE = ("Peaks: dense tensor-core FLOP/s of NVIDIA's datasheets (T4 65 TFLOP/s fp16, A100 312 bf16, H100 SXM "
              "989 bf16; the sparsity figures are twice these).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="", help="pipeline suite: a folder of BraTS subjects ('': the built-in "
                                                   "synthetic set, 10 subjects at 240x240x155)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pipeline suite: grain workers")
    parser.add_argument("--augments", nargs="+", default=["none", "nnunet"], help="pipeline suite: presets")
    parser.add_argument("--wheres", nargs="+", default=["host", "device"], help="pipeline suite: where it augments")
    parser.add_argument("--patches", type=int, default=32, help="pipeline suite: timed batches after the warm-up")


def where_known() -> bool:
    """Whether this release has ``config.data.augment.where`` (augmentation on the device)."""
    from cmfl_jax.config_defaults import augment_config

    return "where" in augment_config()


def pipeline_cases(args: argparse.Namespace, with_torch: bool = False) -> list[dict[str, Any]]:
    """Per size: patches/s of each (preset, where, workers) (no augmentation: host only), then the FLOPs of each
    job's step (``configs/<job>.py:full``, batch 1, XLA's own convolutions: a oneDNN custom call has no count)."""
    cases = []
    for size in args.sizes:
        for augment in args.augments:
            for where in (["host"] if augment == "none" else args.wheres):
                overrides = {"data.root": args.data, "data.patch_size": [size] * 3, "train.batch_size": 1,
                             "data.augment.preset": augment, **({"data.augment.where": where} if where != "host"
                                                                else {})}
                cases += [dict(kind="patches", size=size, augment=augment, where=where, workers=n, seed=args.seed,
                               patches=args.patches, warmup=max(args.warmup, 1), config="configs/cmff.py:full",
                               overrides={**overrides, "data.num_workers": n}) for n in args.workers]
        cases += [dict(kind="flops", job=job, size=size, impl="native", config=f"configs/{job}.py:full",
                       overrides={"data.patch_size": [size] * 3, "model.conv_impl": "native", "train.batch_size": 1,
                                  **({"init.mode": "random"} if job == "cmff" else {})}) for job in JOBS]
    return cases


def skip(case: dict[str, Any]) -> str | None:
    if case.get("where", "host") != "host" and not where_known():
        return "not available: this release has no config.data.augment.where"
    return None


def run_patches(case: dict[str, Any]) -> dict[str, Any]:
    """Batches of ``training_patches`` (what the training loop iterates), timed after ``warmup`` untimed ones and
    as many as grain holds ready (its read-ahead in each process), so that the timed ones are made, not drained."""
    from absl import flags

    from cmfl_jax.data.dataset import load_entries
    from cmfl_jax.data.pipeline import read_ahead
    from cmfl_jax.training.loop import training_patches

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; this process has none of its own
    config = programs.load_config(case["config"], case["overrides"])
    t0 = time.perf_counter()
    entries = load_entries(config.data)
    data_s, baseline = time.perf_counter() - t0, harness.current_rss_mib()
    iterator = iter(training_patches(config, entries))
    try:
        cpu0 = time.process_time()
        batch, workers = config.train.batch_size, config.data.num_workers
        ready = -(-read_ahead(batch).prefetch_buffer_size * max(workers, 1) // batch) + workers
        timing = harness.measure(lambda: next(iterator), case["patches"], case["warmup"] + ready)
        cpu_s = time.process_time() - cpu0
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
    n = batch * len(timing["times_s"])
    return {"subjects": len(entries), "data_s": data_s, "timing": timing, "patches_per_s": n / sum(timing["times_s"]),
            "warmup_batches": case["warmup"] + ready, "main_cpu_s": cpu_s, "baseline_rss_mib": baseline,
            "peak_rss_mib": harness.peak_rss_mib(), "cpu_count": os.cpu_count()}


def unet_conv_flops(size: int, in_channels: int, out_channels: int, base: int, depth: int,
                    padded: bool = False) -> tuple[int, int]:
    """(forward FLOPs of ``UNet3D``'s convolutions on a ``size``^3 input, those of its first conv), 2 per
    multiply-add: 2 k^3 C_in C_out per output voxel; the 2^3 stride-2 transposed conv 2 C_in C_out per output voxel.
    ``padded``: leave out the 3^3 taps that fall in the zero padding, as XLA's cost analysis does."""
    def conv(c_in: int, c_out: int, s: int) -> int:
        return 2 * c_in * c_out * ((3 * s - 2) ** 3 if padded else 27 * s**3)

    total, c_in, s, first = 0, in_channels, size, None
    for level in range(depth + 1):  # the encoder levels, then the bottleneck
        c = base * 2**level
        total += conv(c_in, c, s) + conv(c, c, s)
        first, c_in, s = first or conv(c_in, c, s), c, s // 2
    s *= 2
    for level in reversed(range(depth)):
        c, s = base * 2**level, s * 2
        total += 2 * c_in * c * s**3 + conv(2 * c, c, s) + conv(c, c, s)  # up-conv, then the block on the concat
        c_in = c
    return total + 2 * c_in * out_channels * size**3, first


def unet_train_flops(size: int, in_channels: int, out_channels: int, base: int, depth: int,
                     padded: bool = False) -> int:
    """A train step's convolution FLOPs: forward F, the kernels' gradients F, the inputs' gradients F less the first
    conv's (its input, the image, needs none): 3 F - F_first."""
    forward, first = unet_conv_flops(size, in_channels, out_channels, base, depth, padded)
    return 3 * forward - first


def run_flops(case: dict[str, Any]) -> dict[str, Any]:
    """XLA's FLOPs of the job's train step, lowered and compiled for this backend (one device)."""
    import jax

    from cmfl_jax import sharding

    config = programs.load_config(case["config"], case["overrides"])
    step, states, batch = programs.job_step(config, sharding.make_mesh(jax.devices()[:1]))
    t0 = time.perf_counter()
    compiled = step.lower(states, batch).compile()
    m = config.model
    unets = 2 * unet_train_flops(case["size"], 2, 4, m.base, m.depth) if config.job == "cmff" else None
    return {"flops": programs.xla_flops(compiled), "compile_s": time.perf_counter() - t0, "unets_hand_flops": unets,
            "backend": jax.default_backend(), "global_batch": int(batch["image"].shape[0]),
            "peak_rss_mib": harness.peak_rss_mib()}


RUNNERS = {"patches": run_patches, "flops": run_flops}


def step_flops(records: list[dict[str, Any]]) -> dict[int, tuple[str, float]]:
    """Per size: (job, FLOPs) of the lighter step, the one that needs the most patches per second."""
    out: dict[int, tuple[str, float]] = {}
    for r in records:
        if r["kind"] == "flops" and r["status"] == "ok" and r["flops"]:
            if r["size"] not in out or r["flops"] < out[r["size"]][1]:
                out[r["size"]] = (r["job"], r["flops"])
    return out


def needed(flops: float, peak: float, efficiency: float, batch: int = 1) -> float:
    """Patches per second a GPU at ``efficiency`` x ``peak`` FLOP/s consumes: batch x steps per second."""
    return batch * peak * efficiency / flops


def verdict(have: float, need: float) -> str:
    return "keeps up" if have >= need else f"limits by {need / have:.1f}x"


def describe_case(r: dict[str, Any]) -> list[str]:
    return [f"{r['size']}^3", r["augment"], r["where"], str(r["workers"])]


def pipeline_table(records: list[dict[str, Any]]) -> str:
    """Patches per second, the steps' FLOPs, what each GPU would consume, and the verdict per pipeline case."""
    patches = [r for r in records if r["kind"] == "patches"]
    rows = [describe_case(r) + ([num(r["patches_per_s"]), num(1 / r["patches_per_s"]), str(r["subjects"]),
                                 f"{r['peak_rss_mib']:.0f}", ""] if r["status"] == "ok" else
                                ["-"] * 4 + [f"{r['status'].upper()}: {r.get('error') or r.get('reason')}"[:90]])
            for r in patches]
    parts = ["Patches per second of the training loop's pipeline (`training_patches`: cache, sampler, grain workers; "
             "batch 1; warm-up excluded):", "",
             table(["size", "augment", "where", "workers", "patches/s", "s/patch", "subjects", "peak RSS MiB", "note"],
                   rows)]
    flops = [r for r in records if r["kind"] == "flops"]
    backend = next((r["backend"] for r in flops if r["status"] == "ok"), "-")
    rows = [[r["job"], f"{r['size']}^3", num(r["flops"] / 1e12, ".3f"), num(r["unets_hand_flops"] and
             r["unets_hand_flops"] / 1e12, ".3f"), num(r["compile_s"])] if r["status"] == "ok" else
            [r["job"], f"{r['size']}^3", f"FAILED: {r.get('error', '')[:60]}", "-", "-"] for r in flops]
    parts += ["", f"Train step FLOPs, XLA's cost analysis of the step lowered and compiled for {backend} "
              "(`configs/<job>.py:full`, batch 1, conv_impl native):", "",
              table(["step", "size", "TFLOP/step (XLA)", "two U-Nets' convs, hand count", "compile s"], rows)]
    lighter = step_flops(records)
    sizes = sorted(lighter)
    rows = [[gpu, dtype, f"{peak / 1e12:g}", f"{eff:.0%}"] + [num(needed(lighter[s][1], peak, eff)) for s in sizes]
            for gpu, dtype, peak in GPUS for eff in EFFICIENCIES]
    parts += ["", "Patches per second each GPU would consume (= steps/s at batch 1) on the lighter step of each size ("
              + ", ".join(f"{s}^3: {lighter[s][0]}" for s in sizes) + "):", "",
              table(["GPU", "dtype", "peak TFLOP/s", "efficiency", *(f"{s}^3" for s in sizes)], rows)]
    head = ["size", "augment", "where", "workers", "patches/s"] + [f"{g} {e:.0%}" for g, _, _ in GPUS
                                                                   for e in EFFICIENCIES]
    rows = [describe_case(r) + [num(r["patches_per_s"])] + [verdict(r["patches_per_s"], needed(lighter[r["size"]][1],
                                                                                                peak, eff))
                                                            for _, _, peak in GPUS for eff in EFFICIENCIES]
            for r in patches if r["status"] == "ok" and r["size"] in lighter]
    parts += ["", "The balance: does the pipeline keep up, or by how much does it limit the GPU?", "",
              table(head, rows), "", PEAKS_NOTE + " where=device: the host side only (the worker cuts the patch or "
              "its window and draws the numbers; the accelerator then transforms it, which adds to its step)."]
    return "\n".join(parts)
