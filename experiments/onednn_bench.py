"""Times ``conv_impl="onednn"`` against ``cpu_fast`` and ``native`` on the CPU, interleaved in one process.

``--what convs``: forward + gradient (input and kernel) of every 3^3 convolution of the U-Net (``base``, ``depth``)
at its level's size, summed over the network. ``--what unet``: ``jax.value_and_grad`` of a squared-error loss of the
whole ``UNet3D`` (a train step without the optimizer); ``--what forward``: its forward alone (inference of one
window). Variants of the oneDNN route: ``onednn`` (NDHWC activations,
OpenMP's default threads), ``onednn_blocked`` (oneDNN's blocked activation layout, reordered in and out),
``onednn_1t`` (one OpenMP thread). Each repeat runs every variant once (round robin), so load on the machine
hits all alike; prints the median seconds and the ratio to ``cpu_fast``.

    python -m experiments.onednn_bench --what convs --size 64 --repeats 5
    python -m experiments.onednn_bench --what unet --size 64 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cmfl_jax.models import UNet3D, onednn
from cmfl_jax.models import conv as conv_module

VARIANTS = ("native", "cpu_fast", "onednn", "onednn_blocked", "onednn_1t")


def _setting(variant):
    """(conv_impl, oneDNN layout, oneDNN threads) of a variant."""
    return {"onednn_blocked": ("onednn", 1, 0), "onednn_1t": ("onednn", 0, 1)}.get(
        variant, (variant, 0, 0))


def _trace(variant, fn, *args):
    """``fn`` jitted and compiled with the variant's oneDNN settings (read when tracing)."""
    _, onednn.LAYOUT, onednn.THREADS = _setting(variant)
    try:
        return jax.jit(fn).lower(*args).compile()
    finally:
        onednn.LAYOUT, onednn.THREADS = 0, 0


def conv_layers(base, depth, size, in_channels):
    """(spatial size, C_in, C_out) of every 3^3 conv of UNet3D(base, depth) for a ``size``^3 input."""
    layers, c = [], in_channels
    for level in range(depth + 1):
        f, s = base * 2**level, size // 2**level
        layers += [(s, c, f), (s, f, f)]
        c = f
    for level in reversed(range(depth)):
        f, s = base * 2**level, size // 2**level
        layers += [(s, 2 * f, f), (s, f, f)]
    return layers


def conv_programs(variant, layers, key, dtype):
    impl = _setting(variant)[0]
    progs = []
    for i, (s, c, f) in enumerate(layers):
        x = jax.random.normal(jax.random.fold_in(key, 2 * i), (1, s, s, s, c), jnp.float32)
        k = jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (3, 3, 3, c, f), jnp.float32) * 0.1

        def loss(x, k, impl=impl, f=f):
            y = conv_module.Conv3D(f, 3, 1, 1, impl, dtype).apply({"params": {"kernel": k, "bias": jnp.zeros(f)}}, x)
            return jnp.sum(jnp.square(y.astype(jnp.float32)))

        progs.append((_trace(variant, jax.value_and_grad(loss, (0, 1)), x, k), (x, k)))
    return progs


def unet_program(variant, base, depth, size, key, dtype, forward_only=False):
    impl = _setting(variant)[0]
    model = UNet3D(2, base, depth, impl, dtype)
    x = jax.random.normal(key, (1, size, size, size, 2), jnp.float32)
    params = UNet3D(2, base, depth, "cpu_fast").init(key, x)["params"]

    def loss(params, x):
        out, _ = model.apply({"params": params}, x)
        return jnp.mean((out - x) ** 2)

    if forward_only:
        return [(_trace(variant, lambda params, x: model.apply({"params": params}, x)[0], params, x), (params, x))]
    return [(_trace(variant, jax.value_and_grad(loss), params, x), (params, x))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", choices=("convs", "unet", "forward"), default="convs")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (params stay float32)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if any(v.startswith("onednn") for v in variants) and not onednn.available():
        raise SystemExit(f"the oneDNN library is not loaded: {onednn.load()}")
    key, dtype = jax.random.PRNGKey(0), jnp.dtype(args.dtype)
    if dtype == jnp.bfloat16 and not onednn.bf16_supported():
        print("this CPU runs no oneDNN bfloat16 convolution: the onednn variants run cpu_fast")
    programs = {}
    for v in variants:
        t0 = time.perf_counter()
        if args.what == "convs":
            programs[v] = conv_programs(v, conv_layers(args.base, args.depth, args.size, 2), key, dtype)
        else:
            programs[v] = unet_program(v, args.base, args.depth, args.size, key, dtype, args.what == "forward")
        for prog, inputs in programs[v]:  # warm-up (oneDNN builds its primitives on the first call)
            jax.block_until_ready(prog(*inputs))
        print(f"{v}: compiled and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
    times = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            t0 = time.perf_counter()
            for prog, inputs in programs[v]:
                jax.block_until_ready(prog(*inputs))
            times[v].append(time.perf_counter() - t0)
    ref = statistics.median(times["cpu_fast"]) if "cpu_fast" in times else None
    print(f"{args.what} {args.size}^3 base {args.base} depth {args.depth} {args.dtype}, median of {args.repeats} "
          f"({'forward' if args.what == 'forward' else 'forward + gradient'}), {jax.device_count()} CPU device, "
          f"numpy {np.__version__}")
    for v in variants:
        med = statistics.median(times[v])
        ratio = f"  {med / ref:.2f}x cpu_fast" if ref else ""
        print(f"  {v:15s} {med:8.3f} s{ratio}   (all: {', '.join(f'{t:.2f}' for t in times[v])})")


if __name__ == "__main__":
    main()
