"""Microbenchmark of the strided 3D convolution on CPU: XLA's native op vs the ``cpu_fast`` rewrites.

Times, after compilation, the median of a few runs of the forward and of the gradient (``jax.grad`` w.r.t.
input and kernel of the output summed against a fixed random cotangent) of the discriminator's 4^3
stride-2 padding-1 conv at three sizes and of its 4^3 stride-1 last layer at two, for the native op, the
``cpu_fast`` path and (``--variants``) other exact rewrites of the strided conv, every one first checked
equal to native; then the whole PatchDiscriminator forward+grad at 64^3 for both impls (and variants).

    PYTHONPATH=. .venv/bin/python experiments/conv_microbench.py [--repeats 5] [--variants] [--skip-disc]
        [--only-disc] [--disc-size 64] [--skip-native-disc]
    PYTHONPATH=. .venv/bin/python experiments/conv_microbench.py --unet-conv   # the U-Net conv's gradient
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cmfl_jax.models import PatchDiscriminator
from cmfl_jax.models import conv as conv_module
from cmfl_jax.models.conv import (
    _conv_3d_as_2d,
    _conv_native,
    _conv_valid_as_matmul,
    _space_to_depth,
    _space_to_depth_conv,
)


def s2d_as2d(x, kernel, s, pad):
    """Space-to-depth, then the stride-1 conv as a sum of 2D convs over depth slices, whatever the channels."""
    return _conv_3d_as_2d(*_space_to_depth(x, kernel, s, pad), 0)


def s2d_matmul(x, kernel, s, pad):
    """Space-to-depth, then one matrix product to kq^3*F channels and a sum of shifted slices, whatever the channels."""
    return _conv_valid_as_matmul(*_space_to_depth(x, kernel, s, pad))


def s2d_native(x, kernel, s, pad):
    """Space-to-depth, then XLA's native stride-1 3D conv."""
    x, kernel = _space_to_depth(x, kernel, s, pad)
    return _conv_native(x, kernel, 1, 0)


def s2d_im2col(x, kernel, s, pad):
    """Space-to-depth, then im2col of the kq^3 shifts and one matrix product."""
    x, kernel = _space_to_depth(x, kernel, s, pad)
    kq = kernel.shape[0]
    o = [size - kq + 1 for size in x.shape[1:4]]
    cols = jnp.stack([x[:, a : a + o[0], b : b + o[1], e : e + o[2]]
                      for a in range(kq) for b in range(kq) for e in range(kq)], axis=4)
    return jnp.einsum("ndhwkc,kcf->ndhwf", cols, kernel.reshape(kq**3, *kernel.shape[3:]))


def strided_2d(x, kernel, s, pad):
    """Sum over kernel depth of strided 2D convs of the depth slices each kernel plane sees (no space-to-depth)."""
    k, n, d = kernel.shape[0], x.shape[0], x.shape[1]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0), (0, 0)))
    d_out = (d + 2 * pad - k) // s + 1
    out = None
    for kd in range(k):
        slices = xp[:, kd : kd + s * (d_out - 1) + 1 : s].reshape(n * d_out, *x.shape[2:])
        y = jax.lax.conv_general_dilated(slices, kernel[kd], (s, s), [(pad, pad)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        out = y if out is None else out + y
    return out.reshape(n, d_out, *out.shape[1:])


def kernel_grad_gemm(x, g, k, pad, chunk=16):
    """The kernel gradient of a stride-1 k^3 convolution in GEMM form (PERF.md: tried, slower, not kept).

    ``dK[a, b, e] = sum_v xp[v + (a, b, e)]^T g[v]``: for each kernel depth ``a``, the k^2 in-plane shifts of the
    padded input side by side (an im2col of ``chunk`` output depth slices at a time, which bounds its memory to
    ``chunk * H * W * k^2 * C`` values) times the output gradient, one ``(k^2 C, M) @ (M, F)`` product per chunk.
    """
    c, f = x.shape[-1], g.shape[-1]
    xp = jnp.pad(x, ((0, 0),) + ((pad, pad),) * 3 + ((0, 0),))
    do, ho, wo = g.shape[1:4]
    planes = []
    for a in range(k):
        acc = None
        for d0 in range(0, do, chunk):
            d1 = min(do, d0 + chunk)
            cols = jnp.concatenate([xp[:, d0 + a : d1 + a, b : b + ho, e : e + wo].reshape(-1, c)
                                    for b in range(k) for e in range(k)], axis=1)
            part = cols.T @ g[:, d0:d1].reshape(-1, f)
            acc = part if acc is None else acc + part
        planes.append(acc.reshape(k, k, c, f))
    return jnp.stack(planes)


def as2d_gemm_kernel_grad(pad, chunk=16):
    """``cpu_fast``'s stride-1 conv (2D slices) whose kernel gradient is :func:`kernel_grad_gemm` (a custom_vjp);
    the input gradient stays the transpose of the 2D-slice convolutions."""

    @jax.custom_vjp
    def conv(x, kernel):
        return _conv_3d_as_2d(x, kernel, pad)

    def forward(x, kernel):
        return conv(x, kernel), (x, kernel)

    def backward(res, g):
        x, kernel = res
        _, input_vjp = jax.vjp(lambda x: _conv_3d_as_2d(x, kernel, pad), x)
        return input_vjp(g)[0], kernel_grad_gemm(x, g, kernel.shape[0], pad, chunk)

    conv.defvjp(forward, backward)
    return conv


VARIANTS = {"s2d+as2d": s2d_as2d, "s2d+matmul": s2d_matmul, "s2d+native": s2d_native, "s2d+im2col": s2d_im2col,
            "strided_2d": strided_2d}


def _median_time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _row(name, t_native, t_fast):
    print(f"{name:<44} {t_native * 1e3:10.1f} {t_fast * 1e3:10.1f} {t_native / t_fast:8.2f}x", flush=True)


def _assert_close(got, want):
    """float32 equality, the tolerance scaled to the array's magnitude (gradients sum ~10^5 terms)."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def bench_conv(size, cin, cout, stride, pad, repeats, variants):
    """Forward, and gradient w.r.t. input and kernel of ``<output, g>`` (g a fixed random cotangent)."""
    x = jax.random.normal(jax.random.key(0), (1, size, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (4, 4, 4, cin, cout)) * 0.05
    out = (size + 2 * pad - 4) // stride + 1
    g = jax.random.normal(jax.random.key(2), (1, out, out, out, cout))
    fast = (lambda x, w: _space_to_depth_conv(x, w, stride, pad)) if stride > 1 else (
        lambda x, w: _conv_3d_as_2d(x, w, pad))
    impls = {"native": lambda x, w: _conv_native(x, w, stride, pad), "cpu_fast": fast}
    if variants and stride > 1:
        impls |= {name: lambda x, w, v=v: v(x, w, stride, pad) for name, v in VARIANTS.items()}
    times, ref = {}, None
    for name, f in impls.items():
        fwd = jax.jit(f)
        grad = jax.jit(jax.grad(lambda x, w, g, f=f: jnp.vdot(f(x, w), g), (0, 1)))
        results = (fwd(x, w), *grad(x, w, g))
        if ref is None:
            ref = results
        for got, want in zip(results, ref, strict=True):
            _assert_close(got, want)
        times[name] = (_median_time(fwd, x, w, repeats=repeats), _median_time(grad, x, w, g, repeats=repeats))
    label = f"conv 4^3/{stride} {size}^3x{cin}->{cout}"
    for name, (tf, tg) in times.items():
        if name == "native":
            continue
        suffix = "" if name == "cpu_fast" else f" [{name}]"
        _row(f"{label} fwd{suffix}", times["native"][0], tf)
        _row(f"{label} grad{suffix}", times["native"][1], tg)


def conv_grads_float64(x, w, g, pad):
    """Input and kernel gradients of ``<conv(x, w), g>`` for a stride-1 convolution, in float64 numpy: the reference
    the float32 implementations are held to (each sums up to a million products, so float32 ones differ)."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    k = w.shape[0]
    xp = np.pad(x, ((0, 0),) + ((pad, pad),) * 3 + ((0, 0),))
    gp = np.pad(g, ((0, 0),) + ((k - 1 - pad, k - 1 - pad),) * 3 + ((0, 0),))
    d, h, wd = g.shape[1:4]
    dw, dx = np.zeros_like(w), np.zeros_like(x)
    for a in range(k):
        for b in range(k):
            for e in range(k):
                dw[a, b, e] = np.einsum("ndhwc,ndhwf->cf", xp[:, a : a + d, b : b + h, e : e + wd], g, optimize=True)
                shifted = gp[:, k - 1 - a : k - 1 - a + x.shape[1], k - 1 - b : k - 1 - b + x.shape[2],
                             k - 1 - e : k - 1 - e + x.shape[3]]
                dx += shifted @ w[a, b, e].T
    return dx, dw


def bench_unet_conv(size, cin, cout, repeats):
    """The U-Net's 3^3 stride-1 conv: the gradient of native, ``cpu_fast`` and ``cpu_fast`` with the GEMM-form
    kernel gradient (:func:`as2d_gemm_kernel_grad`), each checked against the float64 reference (largest error at
    most 1e-4 of the largest value) and its errors printed beside native's."""
    x = jax.random.normal(jax.random.key(0), (1, size, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, cin, cout)) * 0.05
    g = jax.random.normal(jax.random.key(2), (1, size, size, size, cout))
    reference = conv_grads_float64(x, w, g, 1)
    impls = {"native": lambda x, w: _conv_native(x, w, 1, 1), "cpu_fast": lambda x, w: _conv_3d_as_2d(x, w, 1),
             "gemm kernel grad": as2d_gemm_kernel_grad(1)}
    times, errors = {}, {}
    for name, f in impls.items():
        grad = jax.jit(jax.grad(lambda x, w, g, f=f: jnp.vdot(f(x, w), g), (0, 1)))
        errors[name] = [float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))
                        for got, want in zip(grad(x, w, g), reference, strict=True)]
        if max(errors[name]) > 1e-4:
            raise AssertionError(f"{name}: relative errors {errors[name]} against float64, native's {errors['native']}")
        times[name] = _median_time(grad, x, w, g, repeats=repeats)
    for name in ("cpu_fast", "gemm kernel grad"):
        _row(f"conv 3^3/1 {size}^3x{cin}->{cout} grad [{name}]", times["native"], times[name])
    print("  largest error / largest value against float64 (input grad, kernel grad): "
          + "; ".join(f"{n} {e[0]:.1e}, {e[1]:.1e}" for n, e in errors.items()), flush=True)


def bench_discriminator(size, repeats, variants, native=True):
    """Forward + gradient w.r.t. params and input; ``variants`` swaps each rewrite into ``cpu_fast`` in turn."""
    x = jax.random.normal(jax.random.key(0), (1, size, size, size, 2))
    params = PatchDiscriminator(conv_impl="native").init(jax.random.key(1), x)
    runs = [("native", None)] * native + [("cpu_fast", None)]
    runs += [("cpu_fast", v) for v in (VARIANTS if variants else ())]
    t = {}
    for impl, variant in runs:
        d = PatchDiscriminator(conv_impl=impl)
        f = jax.jit(lambda p, x, d=d: jax.value_and_grad(lambda p, x: jnp.sum(d.apply(p, x)), (0, 1))(p, x))
        saved = conv_module._space_to_depth_conv
        if variant is not None:
            conv_module._space_to_depth_conv = VARIANTS[variant]
        try:
            t[variant or impl] = _median_time(f, params, x, repeats=repeats)
        finally:
            conv_module._space_to_depth_conv = saved
    for name in t:
        if name != "native":
            suffix = "" if name == "cpu_fast" else f" [{name}]"
            _row(f"PatchDiscriminator {size}^3x2 fwd+grad{suffix}", t.get("native", float("nan")), t[name])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-disc", action="store_true")
    ap.add_argument("--variants", action="store_true", help="also time other exact rewrites of the strided conv")
    ap.add_argument("--disc-size", type=int, default=64, help="PatchDiscriminator input edge")
    ap.add_argument("--skip-native-disc", action="store_true", help="skip the (slow) native discriminator")
    ap.add_argument("--only-disc", action="store_true", help="skip the single-conv cases")
    ap.add_argument("--unet-conv", action="store_true",
                    help="only the U-Net conv gradient: native, cpu_fast, cpu_fast with a GEMM kernel gradient")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; median of {args.repeats} runs after compile")
    print(f"{'case':<44} {'native ms':>10} {'fast ms':>10} {'ratio':>9}")
    if args.unet_conv:
        for size, cin, cout in ((64, 16, 16), (64, 32, 32), (128, 16, 16)):
            bench_unet_conv(size, cin, cout, args.repeats)
        return
    if not args.only_disc:
        bench_conv(64, 16, 32, 2, 1, args.repeats, args.variants)
        bench_conv(32, 32, 64, 2, 1, args.repeats, args.variants)
        bench_conv(64, 2, 16, 2, 1, args.repeats, args.variants)  # the discriminator's first layer at 64^3
        bench_conv(8, 128, 1, 1, 1, args.repeats, args.variants)  # its last layer (stride 1) at 128^3
        bench_conv(4, 128, 1, 1, 1, args.repeats, args.variants)  # ... and at 64^3
    if not args.skip_disc:
        bench_discriminator(args.disc_size, args.repeats, args.variants, native=not args.skip_native_disc)


if __name__ == "__main__":
    main()
