"""Speed and memory of the U-Net on this machine: JAX (each conv_impl and dtype) against its PyTorch twin.

Suite ``unet``: ``UNet3D(out_channels=4, base, depth)`` on a ``(1, S, S, S, 2)`` input (one modality pair).
For each size, conv_impl and dtype (bfloat16: bfloat16 compute, float32 params), and for the PyTorch twin
(``experiments/torch_unet.py``, float32, both memory formats) when ``torch`` imports, a fresh subprocess
measures:

* the cold compile time (``jax.jit(f).lower(...).compile()``, persistent compilation cache off) of the train
  step (softmax + soft Dice against a fixed random one-hot label, Adam 1e-4, donated state) and of the
  forward (logits); PyTorch has no compile step (eager), its first call is recorded instead;
* the median and min of ``--repeats`` calls of each, after one warm-up call;
* the peak RSS of the process (``ru_maxrss``) and its RSS before the model is built.

One process per case makes the peak per case and keeps one case's caches from helping another. The
ratios in the table are JAX time / PyTorch time (below 1: JAX faster) against the faster PyTorch memory
format at that size. The goal: a JAX train step at or below PyTorch's on CPU.

    .venv/bin/python -m experiments.benchmark [--sizes 64 128] [--impls native cpu_fast]
        [--dtypes float32 bfloat16] [--repeats 5] [--no-torch] [--out experiments/results/benchmark.json]

Suite ``goal``: the CPU goal in one run, one row per goal (the unet suite's train steps at each size and
the volume suite's plain inference, one timed call) with cmfl_jax's fastest case against PyTorch/MONAI:

    .venv/bin/python -m experiments.benchmark --suite goal --impls cpu_fast --dtypes float32 --repeats 3 \
        --out experiments/results/benchmark_goal.json

Suite ``devices``: the real CMFF train step (``cmfl_jax.cmff_step.make_train_step``: S_A, S_B, fusion branch,
mask-guided attention, random init) data parallel over ``--devices`` N forced host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, one subprocess each), global batch N x 1; steps/s,
peak RSS and XLA's buffer sizes. ``--devices 1 --sizes 128`` measures the memory of the paper's setting.

PyTorch comes from ``pip install -r requirements-bench.txt``. Every run writes its table next to the JSON
(``.md``). More suites (``--suite``) plug in through
``SUITES`` (case list + table) and ``RUNNERS`` (one function per case kind, run in the child).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("experiments", "results", "benchmark.json")
RESULT_PREFIX = "BENCHMARK_RESULT "
NUM_CLASSES = 4
IN_CHANNELS = 2
LEARNING_RATE = 1e-4
TORCH_MEMORY_FORMATS = ("contiguous", "channels_last_3d")


# --------------------------------------------------------------------------------------------------- memory


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    """Resident set size now, MiB (``/proc``; the peak so far where there is no ``/proc``)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


# --------------------------------------------------------------------------------------------------- timing


def measure(call: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Time ``warmup`` untimed calls (the first one's time kept), then ``repeats`` calls; ``call`` must block."""
    first = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0 if first is None else first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def repeats_for(size: int, repeats: int) -> int:
    """Fewer repeats for the 128^3-and-up cases (a JAX train step there can take over a minute on CPU)."""
    return repeats if size < 128 else min(repeats, max(3, repeats // 2))


def unet_inputs(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random input ``(1, S, S, S, 2)`` and one-hot label ``(1, S, S, S, 4)``, channels last, float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, size, size, size, IN_CHANNELS), dtype=np.float32)
    y = np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, (1, size, size, size))]
    return x, y


# --------------------------------------------------------------------------------------------------- runners
# Each runs in the child process and returns the measured numbers of one case (merged into the case's record).


def random_unet_params(model: Any, seed: int, noise: float = 0.0) -> Any:
    """Params of a flax ``UNet3D`` from :func:`cmfl_jax.models.init_params` (no compiled ``model.init``).

    ``noise`` adds that many standard normals to every bias and norm scale (a test sets it so a mis-copied
    bias or scale shows).
    """
    import jax
    import jax.numpy as jnp

    from cmfl_jax.models import init_params

    small = 2**model.depth  # conv params do not depend on the spatial size
    params = init_params(model, jax.random.key(seed),
                         jax.ShapeDtypeStruct((1, small, small, small, IN_CHANNELS), jnp.float32))
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        if path[-1].key == "kernel" or not noise:
            return leaf
        return leaf + jnp.asarray(noise * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(perturb, params)


def unet_functions(case: dict[str, Any]) -> tuple[Any, Any, Any, Any, Any]:
    """The U-Net of ``case`` (size, base, depth, impl, dtype, seed): (train state, x, y, train step, forward), the
    two functions not yet jitted. Shared with ``experiments/xla_options.py``."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax.training import train_state

    from cmfl_jax.losses import soft_dice_loss
    from cmfl_jax.models import UNet3D
    from cmfl_jax.models.builder import DTYPES

    model = UNet3D(NUM_CLASSES, base=case["base"], depth=case["depth"], conv_impl=case["impl"],
                   dtype=DTYPES[case["dtype"]])
    params = random_unet_params(model, case["seed"])
    state = jax.jit(lambda p: train_state.TrainState.create(apply_fn=model.apply, params=p,
                                                            tx=optax.adam(LEARNING_RATE)))(params)
    x, y = (jnp.asarray(a) for a in unet_inputs(case["size"], case["seed"]))

    def train_step(state, x, y):
        def loss_fn(params):
            logits, _ = state.apply_fn({"params": params}, x)
            return soft_dice_loss(jax.nn.softmax(logits, axis=-1), y)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    def forward(params, x):
        return model.apply({"params": params}, x)[0]

    return state, x, y, train_step, forward


def run_jax_unet(case: dict[str, Any]) -> dict[str, Any]:
    """JAX ``UNet3D`` train step and forward for one (size, conv_impl, dtype); the train step with the CPU's
    ``unet_step`` compiler options (:mod:`cmfl_jax.compiler_options`), as the CMFF step has its own."""
    import jax
    from cmfl_jax.compiler_options import compiler_options

    jax.devices()  # bring the backend up before the baseline
    baseline = current_rss_mib()
    size = case["size"]
    state, x, y, train_step, forward = unet_functions(case)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))

    t0 = time.perf_counter()
    train_compiled = jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options("unet_step")
                             ).lower(state, x, y).compile()
    compile_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    forward_compiled = jax.jit(forward, compiler_options=compiler_options("window")).lower(state.params, x).compile()
    compile_forward = time.perf_counter() - t0
    rss_after_compile = peak_rss_mib()

    holder = {"state": state}
    losses = []

    def train_once():
        holder["state"], loss = train_compiled(holder["state"], x, y)
        jax.block_until_ready((holder["state"], loss))
        losses.append(float(loss))

    repeats = repeats_for(size, case["repeats"])
    train = measure(train_once, repeats, case.get("warmup", 1))
    forward_times = measure(lambda: jax.block_until_ready(forward_compiled(holder["state"].params, x)), repeats,
                            case.get("warmup", 1))
    return {
        "num_params": int(num_params),
        "baseline_rss_mib": baseline,
        "peak_rss_after_compile_mib": rss_after_compile,
        "peak_rss_mib": peak_rss_mib(),
        "compile_train_s": compile_train,
        "compile_forward_s": compile_forward,
        "train": train,
        "forward": forward_times,
        "repeats_run": repeats,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "xla_train_memory": _memory_analysis(train_compiled),
        "xla_forward_memory": _memory_analysis(forward_compiled),
    }


def _memory_analysis(compiled: Any) -> dict[str, float] | None:
    """XLA's own buffer sizes of a compiled function, MiB (None where the backend does not say)."""
    try:
        analysis = compiled.memory_analysis()
        fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")
        return {f.replace("_size_in_bytes", "_mib"): getattr(analysis, f) / 2**20 for f in fields}
    except Exception:
        return None


def run_torch_unet(case: dict[str, Any]) -> dict[str, Any]:
    """PyTorch twin's train step and forward (``inference_mode``) in one memory format, float32."""
    import torch

    from experiments.torch_unet import TorchUNet3D, num_params, soft_dice_loss

    torch.set_num_threads(os.cpu_count() or 1)
    baseline = current_rss_mib()
    torch.manual_seed(case["seed"])
    fmt = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}[case["memory_format"]]
    model = TorchUNet3D(IN_CHANNELS, NUM_CLASSES, case["base"], case["depth"]).to(memory_format=fmt)
    x, y = (torch.from_numpy(a.transpose(0, 4, 1, 2, 3).copy()).to(memory_format=fmt)
            for a in unet_inputs(case["size"], case["seed"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
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

    repeats = repeats_for(case["size"], case["repeats"])
    train = measure(train_once, repeats, case.get("warmup", 1))
    forward_times = measure(forward_once, repeats, case.get("warmup", 1))
    return {
        "num_params": num_params(model),
        "baseline_rss_mib": baseline,
        "peak_rss_mib": peak_rss_mib(),
        "compile_train_s": None,  # eager: the first call (train["first_s"]) is the closest thing
        "compile_forward_s": None,
        "train": train,
        "forward": forward_times,
        "repeats_run": repeats,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "torch_num_threads": torch.get_num_threads(),
    }


VOLUME_SHAPE = (240, 240, 155)  # a BraTS volume
VOLUME_WINDOW = 128


def volume_input(seed: int) -> np.ndarray:
    """A fixed random ``(240, 240, 155, 2)`` volume, channels last (timing does not depend on the content)."""
    return np.random.default_rng(seed).standard_normal((*VOLUME_SHAPE, IN_CHANNELS), dtype=np.float32)


def run_jax_volume(case: dict[str, Any]) -> dict[str, Any]:
    """Full-volume sliding-window inference with ``cmfl_jax.inference`` (128^3 windows, 50 % overlap, Gaussian)."""
    import jax
    import jax.numpy as jnp
    from cmfl_jax.compiler_options import compiler_options

    from cmfl_jax.inference.sliding_window import mirrored, sliding_window
    from cmfl_jax.models import UNet3D

    baseline = current_rss_mib()
    model = UNet3D(NUM_CLASSES, base=case["base"], depth=case["depth"], conv_impl=case["impl"])
    params = random_unet_params(model, case["seed"])

    def probs(params, x):
        return jax.nn.softmax(model.apply({"params": params}, x)[0], axis=-1)

    image = volume_input(case["seed"])
    window = (VOLUME_WINDOW,) * 3
    t0 = time.perf_counter()
    # The compiled executable itself runs every window (and every flip), so no timed call compiles.
    plain = jax.jit(probs, compiler_options=compiler_options("window")).lower(
        params, jnp.zeros((1, *window, IN_CHANNELS), jnp.float32)).compile()
    compile_s = time.perf_counter() - t0
    fn = (lambda p, x: mirrored(lambda y: plain(p, y))(x)) if case["mirror"] else plain
    run = lambda: sliding_window(lambda x: np.asarray(fn(params, x)), image, window, 0.5, 1, "gaussian")
    return {"baseline_rss_mib": baseline, "compile_s": compile_s,
            "volume": measure(run, case["repeats"], case["warmup"]), "peak_rss_mib": peak_rss_mib()}


def run_monai_volume(case: dict[str, Any]) -> dict[str, Any]:
    """MONAI's ``sliding_window_inference`` over the PyTorch twin, same windows, overlap and weighting."""
    import torch
    from monai.inferers import sliding_window_inference

    from experiments.torch_unet import TorchUNet3D

    torch.set_num_threads(os.cpu_count() or 1)
    baseline = current_rss_mib()
    torch.manual_seed(case["seed"])
    model = TorchUNet3D(IN_CHANNELS, NUM_CLASSES, case["base"], case["depth"]).eval()
    x = torch.from_numpy(np.ascontiguousarray(volume_input(case["seed"]).transpose(3, 0, 1, 2)[None]))

    def run():
        with torch.inference_mode():
            sliding_window_inference(x, (VOLUME_WINDOW,) * 3, 1, lambda w: torch.softmax(model(w), dim=1),
                                     overlap=0.5, mode="gaussian")

    return {"baseline_rss_mib": baseline, "compile_s": None, "volume": measure(run, case["repeats"], case["warmup"]),
            "peak_rss_mib": peak_rss_mib()}


def cmff_step_inputs(case: dict[str, Any], mesh: Any) -> tuple[Any, dict, dict]:
    """(config, states replicated on ``mesh``, batch of ``mesh.size`` random patches split over it) for a CMFF step."""
    import jax

    from cmfl_jax import sharding
    from cmfl_jax.training.cmff_step import create_state
    from configs import cmff

    config = cmff.get_config()  # branches="fusion", attention="mask": the paper's network
    config.init.mode = "random"
    config.data.patch_size = (case["size"],) * 3
    config.model.base, config.model.depth = case["base"], case["depth"]
    config.model.conv_impl, config.model.dtype = case["impl"], case["dtype"]
    n, size = mesh.size * config.train.batch_size, case["size"]
    rng = np.random.default_rng(case["seed"])
    batch = {"image": rng.standard_normal((n, size, size, size, 4), dtype=np.float32),
             "label": rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(n, size, size, size))}
    states = {"seg": create_state(jax.random.key(case["seed"]), config)}
    return config, sharding.replicate(states, mesh), sharding.shard_batch(batch, mesh)


def run_jax_cmff_devices(case: dict[str, Any]) -> dict[str, Any]:
    """The CMFF train step on all devices of this process (the parent forced ``case["devices"]`` host devices).

    ``repeats`` 0: compile only, for XLA's memory estimate of a step too slow to run here (``native`` at 128^3).
    """
    import jax

    from cmfl_jax import sharding
    from cmfl_jax.training.cmff_step import make_train_step

    if jax.device_count() != case["devices"]:
        raise RuntimeError(f"expected {case['devices']} devices, JAX has {jax.device_count()}")
    baseline = current_rss_mib()
    mesh = sharding.make_mesh()
    config, states, batch = cmff_step_inputs(case, mesh)
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = make_train_step(config, mesh).lower(states, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    global_batch = int(batch["image"].shape[0])
    record = {
        "device_count": jax.device_count(),
        "global_batch": global_batch,
        "batch_devices": len(batch["image"].sharding.device_set),
        "baseline_rss_mib": baseline,
        "compile_train_s": compile_s,
        "xla_train_memory": _memory_analysis(compiled),
        "train": None,
    }
    if case["repeats"] > 0:
        holder, losses = {"states": states}, []

        def train_once():
            holder["states"], metrics = compiled(holder["states"], batch, rng)
            losses.append(float(jax.block_until_ready(metrics)["loss"]))

        train = measure(train_once, case["repeats"], case.get("warmup", 1))
        record.update(train=train, steps_per_s=1.0 / train["median_s"], samples_per_s=global_batch / train["median_s"],
                      loss_first=losses[0], loss_last=losses[-1])
    return {**record, "peak_rss_mib": peak_rss_mib()}


Runner = Callable[[dict[str, Any]], dict[str, Any]]
RUNNERS: dict[str, Runner] = {"jax_unet": run_jax_unet, "torch_unet": run_torch_unet,
                              "jax_volume": run_jax_volume, "monai_volume": run_monai_volume,
                              "jax_cmff_devices": run_jax_cmff_devices}
FRAMEWORK = {"jax_unet": "jax", "torch_unet": "torch", "jax_volume": "jax", "monai_volume": "torch",
             "jax_cmff_devices": "jax"}


# --------------------------------------------------------------------------------------------------- suites


def unet_cases(args: argparse.Namespace, with_torch: bool) -> list[dict[str, Any]]:
    """Per size: the PyTorch twin in each memory format (first, so JAX progress lines can show ratios), then JAX."""
    common = dict(base=args.base, depth=args.depth, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    cases = []
    for size in args.sizes:
        if with_torch:
            cases += [dict(kind="torch_unet", size=size, impl=f"eager/{fmt}", dtype="float32", memory_format=fmt,
                           **common) for fmt in TORCH_MEMORY_FORMATS]
        cases += [dict(kind="jax_unet", size=size, impl=impl, dtype=dtype, **common)
                  for impl in args.impls for dtype in args.dtypes]
    return cases


def torch_references(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Per (size, base, depth): the successful PyTorch record with the fastest train step (the comparator)."""
    refs: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r["kind"] != "torch_unet" or r.get("status") != "ok":
            continue
        key = (r["size"], r["base"], r["depth"])
        if key not in refs or r["train"]["median_s"] < refs[key]["train"]["median_s"]:
            refs[key] = r
    return refs


def _ratio(record: dict[str, Any], ref: dict[str, Any] | None, part: str) -> float | None:
    if ref is None or record.get("status") != "ok":
        return None
    return record[part]["median_s"] / ref[part]["median_s"]


def _num(value: float | None, fmt: str = ".3g") -> str:
    return "-" if value is None else format(value, fmt)


def unet_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of the unet suite, ratios against each size's PyTorch reference."""
    refs = torch_references(records)
    head = ["size", "framework", "impl", "dtype", "compile train s", "compile fwd s", "train s (median)",
            "fwd s (median)", "peak RSS MiB (baseline)", "train / torch", "fwd / torch", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        ref = refs.get((r["size"], r["base"], r["depth"]))
        ok = r.get("status") == "ok"
        note = "PyTorch reference" if ref is r else ("" if ok else "FAILED: " + r.get("error", "")[:80])
        cells = [f"{r['size']}^3", FRAMEWORK[r["kind"]], r["impl"], r["dtype"]]
        if ok:
            cells += [_num(r["compile_train_s"]), _num(r["compile_forward_s"]), _num(r["train"]["median_s"]),
                      _num(r["forward"]["median_s"]), f"{r['peak_rss_mib']:.0f} ({r['baseline_rss_mib']:.0f})",
                      _num(_ratio(r, ref, "train"), ".2f"), _num(_ratio(r, ref, "forward"), ".2f")]
        else:
            cells += ["-"] * 7
        lines.append("| " + " | ".join([*cells, note]) + " |")
    lines.append("")
    lines.append("Ratios: JAX (or the other PyTorch format) time / PyTorch reference time; below 1 is faster than "
                 "PyTorch. Reference: the PyTorch memory format with the faster train step at that size. "
                 "PyTorch is eager (no compile).")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Suite:
    """A benchmark group: its cases from the command line, and the table of its records."""

    cases: Callable[[argparse.Namespace, bool], list[dict[str, Any]]]
    table: Callable[[list[dict[str, Any]]], str]


def volume_cases(args: argparse.Namespace, with_torch: bool) -> list[dict[str, Any]]:
    """MONAI first (the reference), then cmfl_jax without and with test-time mirroring."""
    common = dict(size=VOLUME_WINDOW, base=args.base, depth=args.depth, repeats=args.repeats,
                  warmup=args.warmup, seed=args.seed, dtype="float32")
    cases = [dict(kind="monai_volume", impl="monai", mirror=False, **common)] if with_torch else []
    for impl in args.impls:
        cases += [dict(kind="jax_volume", impl=impl, mirror=m, **common) for m in (False, True)]
    return cases


def monai_reference(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The successful MONAI volume record (the volume comparator), if any."""
    return next((r for r in records if r["kind"] == "monai_volume" and r.get("status") == "ok"), None)


def volume_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of the volume suite: seconds per 240x240x155 subject, ratio against MONAI."""
    ref = monai_reference(records)
    lines = ["| framework | impl | mirroring | compile s | s per subject (median) | peak RSS MiB | / MONAI |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {FRAMEWORK[r['kind']]} | {r['impl']} | {r['mirror']} | FAILED: {r.get('error', '')[:60]} "
                         "| - | - | - |")
            continue
        ratio = r["volume"]["median_s"] / ref["volume"]["median_s"] if ref else None
        lines.append(f"| {FRAMEWORK[r['kind']]} | {r['impl']} | {'8 flips' if r['mirror'] else 'no'} | "
                     f"{_num(r['compile_s'])} | {_num(r['volume']['median_s'])} | {r['peak_rss_mib']:.0f} | "
                     f"{_num(ratio, '.2f')} |")
    lines.append("")
    lines.append(f"One {VOLUME_SHAPE[0]}x{VOLUME_SHAPE[1]}x{VOLUME_SHAPE[2]} volume, 2 channels, {VOLUME_WINDOW}^3 "
                 "windows, 50 % overlap, Gaussian weighting, 1 window per call; MONAI: sliding_window_inference over "
                 "the PyTorch twin (eager, inference_mode).")
    return "\n".join(lines)


def goal_cases(args: argparse.Namespace, with_torch: bool) -> list[dict[str, Any]]:
    """The CPU goal in one run: the unet suite's cases, then the volume suite's plain inference (one timed call,
    no warm-up: a volume is ~1 min here; mirroring has its own run in the volume suite)."""
    volume = [{**c, "repeats": 1, "warmup": 0} for c in volume_cases(args, with_torch) if not c["mirror"]]
    return unet_cases(args, with_torch) + volume


def goal_table(records: list[dict[str, Any]]) -> str:
    """One row per goal (train step per size, full-volume inference): cmfl_jax's best against PyTorch/MONAI,
    then the unet and volume tables the numbers come from."""
    unet = [r for r in records if r["kind"].endswith("_unet")]
    volume = [r for r in records if r["kind"].endswith("_volume")]
    refs = torch_references(unet)
    lines = ["| goal | PyTorch/MONAI s | cmfl_jax s (impl, dtype) | cmfl_jax / PyTorch |", "|---|---|---|---|"]
    for size in sorted({r["size"] for r in unet}):
        ref = refs.get(next((r["size"], r["base"], r["depth"]) for r in unet if r["size"] == size))
        ok = [r for r in unet if r["size"] == size and r["kind"] == "jax_unet" and r.get("status") == "ok"]
        best = min(ok, key=lambda r: r["train"]["median_s"], default=None)
        lines.append(f"| train step {size}^3 | {_num(ref['train']['median_s']) if ref else '-'} | "
                     + (f"{_num(best['train']['median_s'])} ({best['impl']}, {best['dtype']})" if best else "-")
                     + f" | {_num(_ratio(best, ref, 'train'), '.2f') if best else '-'} |")
    monai = monai_reference(volume)
    ok = [r for r in volume if r["kind"] == "jax_volume" and r.get("status") == "ok"]
    best = min(ok, key=lambda r: r["volume"]["median_s"], default=None)
    if volume:
        ratio = best["volume"]["median_s"] / monai["volume"]["median_s"] if best and monai else None
        lines.append(f"| full volume {'x'.join(map(str, VOLUME_SHAPE))} | "
                     f"{_num(monai['volume']['median_s']) if monai else '-'} | "
                     + (f"{_num(best['volume']['median_s'])} ({best['impl']}, float32)" if best else "-")
                     + f" | {_num(ratio, '.2f')} |")
    lines.append("")
    lines.append("The goal: every ratio at or below 1.00.")
    parts = [*lines, "", unet_table(unet)] + (["", volume_table(volume)] if volume else [])
    return "\n".join(parts)


def devices_cases(args: argparse.Namespace, with_torch: bool) -> list[dict[str, Any]]:
    """Per size, conv_impl and dtype: the CMFF step on each of ``--devices`` forced host device counts."""
    del with_torch
    common = dict(base=args.base, depth=args.depth, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    return [dict(kind="jax_cmff_devices", devices=n, size=size, impl=impl, dtype=dtype, **common)
            for size in args.sizes for impl in args.impls for dtype in args.dtypes for n in args.devices]


def _mib(memory: dict[str, float] | None) -> str:
    if not memory:
        return "-"
    return f"{memory['temp_mib'] + memory['argument_mib'] + memory['output_mib'] - memory['alias_mib']:.0f}"


def devices_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of the devices suite: steps/s and samples/s of the CMFF step per device count."""
    head = ["size", "base/depth", "impl", "dtype", "devices", "global batch", "compile s", "step s (median)",
            "steps/s", "samples/s", "peak RSS MiB", "XLA temp+args+out MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [f"{r['size']}^3", f"{r['base']}/{r['depth']}", r["impl"], r["dtype"], str(r["devices"])]
        if r.get("status") == "ok":
            timed = r["train"] is not None  # else compile only
            cells += [str(r["global_batch"]), _num(r["compile_train_s"]),
                      _num(r["train"]["median_s"]) if timed else "(not run)", _num(r.get("steps_per_s")),
                      _num(r.get("samples_per_s")), f"{r['peak_rss_mib']:.0f}", _mib(r.get("xla_train_memory"))]
        else:
            cells += ["FAILED: " + r.get("error", "")[:60]] + ["-"] * 6
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("CMFF train step (S_A + S_B + fusion branch with mask-guided attention, Adam), data parallel: "
                 "batch split over the devices, states replicated, global batch = devices x 1. The devices are "
                 "forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) sharing the same CPU "
                 "cores: this shows that the sharded step runs and what its overhead is, not a speed-up. "
                 "XLA column: temp + argument + output - aliased (donated) bytes of the compiled step, per device.")
    return "\n".join(lines)


SUITES = {"unet": Suite(unet_cases, unet_table), "volume": Suite(volume_cases, volume_table),
          "devices": Suite(devices_cases, devices_table), "goal": Suite(goal_cases, goal_table)}


# --------------------------------------------------------------------------------------------------- processes


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this process: the case's fields plus ``status`` and the runner's numbers (or ``error``)."""
    try:
        return {**case, "status": "ok", **RUNNERS[case["kind"]](case)}
    except Exception as e:
        traceback.print_exc()
        return {**case, "status": "failed", "error": _error_line(e)}


def _error_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def child_main(case_json: str) -> int:
    """Entry of the per-case subprocess: cold compiles, one JSON result line on stdout."""
    case = json.loads(case_json)
    if FRAMEWORK.get(case["kind"]) == "jax":
        import jax

        jax.config.update("jax_enable_compilation_cache", False)
    record = run_case(case)
    print(RESULT_PREFIX + json.dumps(record), flush=True)
    return 0 if record["status"] == "ok" else 1


def run_case_subprocess(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a fresh ``python -m experiments.benchmark --case`` process; a crash is a failed record."""
    cmd = [sys.executable, "-m", "experiments.benchmark", "--case", json.dumps(case)]
    env = dict(os.environ)
    if "devices" in case:
        from cmfl_jax.sharding import forced_host_devices_env

        env = forced_host_devices_env(case["devices"], env)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**case, "status": "failed", "error": f"timed out after {timeout:.0f} s", "wall_s": timeout}
    record = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            record = json.loads(line[len(RESULT_PREFIX):])
    if record is None:
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        error = err[-1].strip() if err else ""
        if proc.returncode < 0:
            error = f"killed by signal {-proc.returncode} (out of memory?) {error}".strip()
        record = {**case, "status": "failed", "error": error or f"exit code {proc.returncode}"}
    record["wall_s"] = time.perf_counter() - t0
    return record


# --------------------------------------------------------------------------------------------------- parent


def torch_version() -> str | None:
    """PyTorch's version if ``import torch`` works here, else None."""
    try:
        import torch

        return str(torch.__version__)
    except Exception:
        return None


def machine_info(torch_ver: str | None) -> dict[str, Any]:
    """What the numbers depend on: CPU, core count, library versions, JAX backend."""
    import jax
    import jaxlib

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "processor": platform.processor(),
        "cpu_model": cpu_model,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch_ver,
    }


def describe(case: dict[str, Any]) -> str:
    if "devices" in case:
        return f"{case['size']}^3 cmff {case['impl']} {case['dtype']} on {case['devices']} devices"
    if case["kind"].endswith("_volume"):
        return f"volume {FRAMEWORK[case['kind']]} {case['impl']} mirror={case['mirror']}"
    return f"{case['size']}^3 {FRAMEWORK[case['kind']]} {case['impl']} {case['dtype']}"


def summary(record: dict[str, Any], ref: dict[str, Any] | None) -> str:
    """One progress line for a finished case."""
    if record["status"] != "ok":
        return f"FAILED after {record['wall_s']:.0f} s: {record['error']}"
    if "volume" in record:
        return f"{record['volume']['median_s']:.3g} s per subject, peak {record['peak_rss_mib']:.0f} MiB"
    if record.get("kind") == "jax_cmff_devices" and record["train"] is None:
        return f"compiled in {record['compile_train_s']:.3g} s, XLA {_mib(record['xla_train_memory'])} MiB"
    if "steps_per_s" in record:
        return (f"{record['steps_per_s']:.3g} steps/s, compile {record['compile_train_s']:.3g} s, peak "
                f"{record['peak_rss_mib']:.0f} MiB (case {record['wall_s']:.0f} s)")
    text = (f"train {record['train']['median_s']:.3g} s, forward {record['forward']['median_s']:.3g} s, "
            f"peak {record['peak_rss_mib']:.0f} MiB")
    if record["compile_train_s"] is not None:
        text += f", compile {record['compile_train_s']:.3g} + {record['compile_forward_s']:.3g} s"
    if ref is not None and ref is not record:
        text += f", train / torch {_ratio(record, ref, 'train'):.2f}"
    return text + f" (case {record['wall_s']:.0f} s)"


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write atomically (temporary name, then rename), so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="unet")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128],
                        help="cube edges S of the (1, S, S, S, 2) input")
    parser.add_argument("--impls", nargs="+", default=["native", "cpu_fast"], choices=["native", "cpu_fast", "auto"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--base", type=int, default=16, help="filters of the first U-Net level")
    parser.add_argument("--depth", type=int, default=4, help="down-samplings of the U-Net")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up (fewer at 128^3 and up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4],
                        help="devices suite: forced host device counts, one subprocess each")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparator")
    parser.add_argument("--case-timeout", type=float, default=3600.0, help="seconds before a case counts as failed")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON file of all raw numbers")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON) in this process
    args = parser.parse_args(argv)
    if args.case is None:
        bad = [s for s in args.sizes if s % 2**args.depth]
        if bad:
            parser.error(f"sizes {bad} are not multiples of 2**depth = {2**args.depth}")
        if args.repeats < (0 if args.suite == "devices" else 1) or args.warmup < 0:
            parser.error("--repeats must be at least 1 (devices suite: 0 = compile only) and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case is not None:
        return child_main(args.case)
    suite = SUITES[args.suite]
    torch_ver = None if args.no_torch else torch_version()
    if not args.no_torch and torch_ver is None:
        print("note: PyTorch is not importable (pip install -r requirements-bench.txt): JAX cases only", flush=True)
    machine = machine_info(torch_ver)
    print(f"machine: {machine['cpu_model'] or machine['processor']}, {machine['cpus_usable']} cpus, "
          f"jax {machine['jax']} ({machine['jax_backend']}), torch {torch_ver or '-'}", flush=True)
    cases = suite.cases(args, torch_ver is not None)
    payload: dict[str, Any] = {
        "suite": args.suite,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine,
        "records": [],
    }
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {describe(case)} ...", flush=True)
        record = run_case_subprocess(case, args.case_timeout)
        payload["records"].append(record)
        ref = torch_references(payload["records"]).get((case.get("size"), case["base"], case["depth"]))
        print(f"[{i}/{len(cases)}] {describe(case)}: {summary(record, ref)}", flush=True)
        write_json(args.out, payload)  # after every case: a run cut short keeps what it measured
    payload["references"] = {f"{k[0]}^3": r["memory_format"] for k, r in torch_references(payload["records"]).items()}
    write_json(args.out, payload)
    table = suite.table(payload["records"])
    table_path = os.path.splitext(args.out)[0] + ".md"
    with open(table_path + ".tmp", "w") as f:
        f.write(f"`{' '.join(['python -m experiments.benchmark', *payload['argv']])}` ({payload['started']}, "
                f"{machine['cpu_model'] or machine['processor']}, {machine['cpus_usable']} cpus, "
                f"jax {machine['jax']})\n\n{table}\n")
    os.replace(table_path + ".tmp", table_path)
    print()
    print(table)
    print(f"\nwrote {args.out} and {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
