"""Speed and memory on this machine: the U-Net against its PyTorch twin, full-volume inference against MONAI, and
the CMFF step data parallel over N devices; every case in a fresh process (``experiments/harness.py``).

    .venv/bin/python -m experiments.benchmark [--suite unet|volume|goal|devices|pipeline|step_split] [--sizes 64 128]
        [--impls native cpu_fast] [--dtypes float32 bfloat16] [--repeats 5] [--no-torch] [--out FILE.json]
        [--data ROOT] [--workers 1 2] [--augments none nnunet] [--wheres host device] [--patches 32] [--steps 24]

``unet``: ``UNet3D(4, base, depth)`` train step (softmax + soft Dice, Adam 1e-4, donated state) and forward on a
``(1, S, S, S, 2)`` input per size, conv_impl and dtype, against ``experiments/torch_unet.py`` in both memory
formats (ratios against the faster one). ``volume``: sliding-window inference of one 240x240x155 volume, 128^3
windows, against MONAI's ``sliding_window_inference``. ``goal``: both in one run. ``devices``: the paper's CMFF
step (``configs/cmff.py:full``, random init, the sizes from the flags) over ``--devices`` N forced host devices,
global batch N x 1 (``--repeats 0``: compile only). ``pipeline``: whether the input pipeline feeds a GPU
(``experiments/pipeline_balance.py``); ``step_split``: where a CPU step's time goes (``experiments/step_split.py``).
The table goes next to the JSON (``.md``); the recorded runs and what they mean are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from experiments import harness, pipeline_balance, programs, step_split
from experiments.benchmark_tables import (
    VOLUME_SHAPE,
    VOLUME_WINDOW,
    devices_table,
    goal_table,
    torch_references,
    unet_table,
    volume_table,
)

TORCH_MEMORY_FORMATS = ("contiguous", "channels_last_3d")


def repeats_for(size: int, repeats: int) -> int:
    """Fewer repeats for the 128^3-and-up cases (a JAX train step there can take over a minute on CPU)."""
    return repeats if size < 128 else min(repeats, max(3, repeats // 2))


def run_jax_unet(case: dict[str, Any]) -> dict[str, Any]:
    """Cold compile, then timed calls, of the U-Net's train step and forward in one (size, conv_impl, dtype)."""
    import jax

    jax.devices()  # bring the backend up before the baseline
    baseline = harness.current_rss_mib()
    state, x, y, train_step, forward = programs.unet_functions(case)
    repeats, warmup = repeats_for(case["size"], case["repeats"]), case.get("warmup", 1)
    fwd, _ = programs.compile_and_time(jax.jit(forward), (state.params, x), repeats, warmup, donated=False)
    train, losses = programs.compile_and_time(jax.jit(train_step, donate_argnums=0), (state, x, y), repeats, warmup,
                                              loss=lambda out: out[1])  # last: the step donates the state
    return {"num_params": int(sum(leaf.size for leaf in jax.tree.leaves(state.params))),
            "baseline_rss_mib": baseline, "peak_rss_mib": harness.peak_rss_mib(), "compile_train_s": train["compile_s"],
            "compile_forward_s": fwd["compile_s"], "train": train["timing"], "forward": fwd["timing"],
            "repeats_run": repeats, "loss_first": losses[0], "loss_last": losses[-1],
            "xla_train_memory": train["xla_memory"], "xla_forward_memory": fwd["xla_memory"]}


def _torch_model(case: dict[str, Any]) -> Any:
    import torch

    from experiments.torch_unet import TorchUNet3D

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(case["seed"])
    return TorchUNet3D(programs.UNET_CHANNELS, programs.NUM_CLASSES, case["base"], case["depth"])


def run_torch_unet(case: dict[str, Any]) -> dict[str, Any]:
    """The PyTorch twin's train step and forward (``inference_mode``) in one memory format, float32, eager."""
    import torch

    from experiments.torch_unet import num_params, soft_dice_loss

    baseline = harness.current_rss_mib()
    fmt = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}[case["memory_format"]]
    model = _torch_model(case).to(memory_format=fmt)
    x, y = (torch.from_numpy(a.transpose(0, 4, 1, 2, 3).copy()).to(memory_format=fmt)
            for a in programs.unet_inputs(case["size"], case["seed"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=programs.LEARNING_RATE)
    losses = []

    def train_once():
        optimizer.zero_grad(set_to_none=True)
        loss = soft_dice_loss(torch.softmax(model(x), dim=1), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    def forward_once():
        with torch.inference_mode():
            model(x)

    repeats, warmup = repeats_for(case["size"], case["repeats"]), case.get("warmup", 1)
    train = harness.measure(train_once, repeats, warmup)
    return {"num_params": num_params(model), "baseline_rss_mib": baseline, "compile_train_s": None,
            "compile_forward_s": None, "train": train, "forward": harness.measure(forward_once, repeats, warmup),
            "peak_rss_mib": harness.peak_rss_mib(), "repeats_run": repeats, "loss_first": losses[0],
            "loss_last": losses[-1], "torch_num_threads": torch.get_num_threads()}


def run_monai_volume(case: dict[str, Any]) -> dict[str, Any]:
    """MONAI's ``sliding_window_inference`` over the PyTorch twin, same windows, overlap and weighting."""
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    baseline = harness.current_rss_mib()
    model = _torch_model(case).eval()
    image = np.random.default_rng(case["seed"]).standard_normal((*case["volume"], programs.UNET_CHANNELS),
                                                                dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(3, 0, 1, 2)[None]))

    def run():
        with torch.inference_mode():
            sliding_window_inference(x, (case["window"],) * 3, 1, lambda w: torch.softmax(model(w), dim=1),
                                     overlap=0.5, mode="gaussian")

    return {"baseline_rss_mib": baseline, "compile_s": None, "peak_rss_mib": harness.peak_rss_mib(),
            "volume": harness.measure(run, case["repeats"], case["warmup"])}


RUNNERS = {"jax_unet": run_jax_unet, "torch_unet": run_torch_unet, "jax_volume": programs.run_volume,
           "monai_volume": run_monai_volume, "jax_cmff_devices": programs.run_step, **pipeline_balance.RUNNERS,
           **step_split.RUNNERS}


def unet_cases(args: argparse.Namespace, with_torch: bool) -> list[dict[str, Any]]:
    """Per size: the PyTorch twin in each memory format (first, so JAX progress lines can show ratios), then JAX."""
    common = dict(base=args.base, depth=args.depth, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    cases = []
    for size in args.sizes:
        cases += [dict(kind="torch_unet", size=size, impl=f"eager/{fmt}", dtype="float32", memory_format=fmt,
                       **common) for fmt in TORCH_MEMORY_FORMATS if with_torch]
        cases += [dict(kind="jax_unet", size=size, impl=impl, dtype=dtype, **common)
                  for impl in args.impls for dtype in args.dtypes]
    return cases


def volume_cases(args: argparse.Namespace, with_torch: bool) -> list[dict[str, Any]]:
    """MONAI first (the reference), then cmfl_jax without and with test-time mirroring."""
    common = dict(size=VOLUME_WINDOW, window=VOLUME_WINDOW, volume=VOLUME_SHAPE, net="unet", base=args.base,
                  depth=args.depth, repeats=args.repeats, warmup=args.warmup, seed=args.seed, dtype="float32")
    cases = [dict(kind="monai_volume", impl="monai", mirror=False, **common)] if with_torch else []
    return cases + [dict(kind="jax_volume", impl=impl, mirror=m, **common)
                    for impl in args.impls for m in (False, True)]


def goal_cases(args: argparse.Namespace, with_torch: bool) -> list[dict[str, Any]]:
    """The unet suite's cases, then the volume suite's plain inference (one timed call, no warm-up)."""
    volume = [{**c, "repeats": 1, "warmup": 0} for c in volume_cases(args, with_torch) if not c["mirror"]]
    return unet_cases(args, with_torch) + volume


def devices_cases(args: argparse.Namespace, with_torch: bool) -> list[dict[str, Any]]:
    """Per size, conv_impl and dtype: the paper's ``--job`` step (CMFF, or CMFT's four networks) on each of
    ``--devices`` forced host device counts."""
    init = {"init.mode": "random"} if args.job == "cmff" else {}
    return [dict(kind="jax_cmff_devices", devices=n, size=size, impl=impl, dtype=dtype, base=args.base,
                 depth=args.depth, repeats=args.repeats, warmup=args.warmup, seed=args.seed, job=args.job,
                 config=f"configs/{args.job}.py:full",
                 overrides={**init, "data.patch_size": [size] * 3, "model.base": args.base,
                            "model.depth": args.depth, "model.conv_impl": impl, "model.dtype": dtype})
            for size in args.sizes for impl in args.impls for dtype in args.dtypes for n in args.devices]


SUITES = {"unet": (unet_cases, unet_table), "volume": (volume_cases, volume_table),
          "devices": (devices_cases, devices_table), "goal": (goal_cases, goal_table),
          "pipeline": (pipeline_balance.pipeline_cases, pipeline_balance.pipeline_table),
          "step_split": (step_split.split_cases, step_split.split_table)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="unet")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="cube edges S of the input")
    parser.add_argument("--impls", nargs="+", default=["native", "cpu_fast"],
                        choices=["native", "cpu_fast", "onednn", "auto"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--base", type=int, default=16, help="filters of the first U-Net level")
    parser.add_argument("--depth", type=int, default=4, help="down-samplings of the U-Net")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up (fewer at 128^3 and up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4], help="devices suite: device counts")
    parser.add_argument("--job", choices=["cmff", "cmft"], default="cmff", help="devices suite: the step measured")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparator")
    pipeline_balance.add_arguments(parser)
    step_split.add_arguments(parser)
    parser.add_argument("--case-timeout", type=float, default=3600.0, help="seconds before a case counts as failed")
    parser.add_argument("--out", default=os.path.join("experiments", "results", "benchmark.json"),
                        help="JSON file of all raw numbers (the table goes next to it, .md)")
    args = parser.parse_args(argv)
    if [s for s in args.sizes if s % 2**args.depth]:
        parser.error(f"sizes {args.sizes} must be multiples of 2**depth = {2**args.depth}")
    if args.repeats < (0 if args.suite == "devices" else 1) or args.warmup < 0:
        parser.error("--repeats must be at least 1 (devices suite: 0 = compile only) and --warmup at least 0")
    return args


def torch_version() -> str | None:
    try:
        import torch

        return str(torch.__version__)
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    make_cases, make_table = SUITES[args.suite]
    torch_ver = None if args.no_torch else torch_version()
    if not args.no_torch and torch_ver is None:
        print("note: PyTorch is not importable (pip install -r requirements-bench.txt): JAX cases only", flush=True)
    machine = harness.machine_info(torch=torch_ver)
    print(f"machine: {harness.describe_machine(machine)}, torch {torch_ver or '-'}", flush=True)
    env = lambda case: None
    if args.suite == "devices":
        env = lambda case: programs.forced_host_devices_env(case["devices"], os.environ)
    references = lambda records: {"references": {f"{k[0]}^3": r["memory_format"]
                                                 for k, r in torch_references(records).items()}}
    harness.run_suite("experiments.benchmark", argv, make_cases(args, torch_ver is not None), args.out, make_table,
                      machine, {"suite": args.suite}, references, timeout=lambda case: args.case_timeout, env=env,
                      skip=pipeline_balance.skip)
    return 0


if __name__ == "__main__":
    sys.exit(main())
