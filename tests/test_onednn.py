"""``conv_impl="onednn"`` (oneDNN through XLA FFI custom calls) equals XLA's native op, forward and gradients, and
falls back to ``cpu_fast`` (one log line) when its library is not built or does not load.

The tests that run the library skip, with the reason, where it was not built (no C++ compiler, no oneDNN wheel for
the platform): :func:`cmfl_jax.models.onednn.load` says why.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cmfl_jax.models import Conv3D, UNet3D, onednn
from cmfl_jax.models import conv as conv_module

needs_library = pytest.mark.skipif(not onednn.available(),
                                   reason=f"the oneDNN library is not loaded: {onednn.load()}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _close(actual, expected, rtol=1e-4):
    """Equal within float32 rounding: ``rtol`` of each value, plus 1e-5 of the largest (sums near zero)."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-5 * float(np.max(np.abs(expected))))


# (N, D, H, W, C_in, C_out, kernel, stride, padding): the U-Net's 3^3 and 1^3, strided 3^3, the PatchGAN's 4^3
# stride 2, CBAM's 7^3 to one channel; odd sizes, batch > 1.
SHAPES = [
    (2, 7, 9, 5, 3, 4, 3, 1, 1),
    (1, 9, 6, 7, 5, 3, 3, 2, 1),
    (2, 8, 9, 10, 3, 5, 4, 2, 1),
    (3, 5, 6, 7, 4, 6, 1, 1, 0),
    (1, 9, 8, 7, 2, 1, 7, 1, 3),
    (2, 11, 7, 6, 6, 2, 3, 2, 0),
]


@needs_library
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_both_gradients_equal_native(shape):
    n, d, h, w, c, f, k, s, p = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, d, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, k, c, f)), jnp.float32)
    native = lambda x, kernel: conv_module._conv_native(x, kernel, s, p)
    fast = lambda x, kernel: onednn.conv(x, kernel, s, p)
    y_native, y = jax.jit(native)(x, kernel), jax.jit(fast)(x, kernel)
    assert y.shape == y_native.shape
    _close(y, y_native)
    cot = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    grads = {name: jax.jit(jax.grad(lambda x, kernel, fn=fn: jnp.sum(fn(x, kernel) * cot), (0, 1)))(x, kernel)
             for name, fn in (("native", native), ("onednn", fast))}
    for g, g_native in zip(grads["onednn"], grads["native"], strict=True):
        _close(g, g_native)


@pytest.mark.skipif(not onednn.bf16_supported(), reason="this CPU runs no oneDNN bfloat16 convolution "
                                                          "(or the library is not loaded)")
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_forward_and_gradients_equal_float32_within_bfloat16_rounding(shape):
    """bfloat16 operands, float32 accumulation: within bfloat16's rounding (8 bits) of the float32 native op on the
    same (rounded) operands."""
    n, d, h, w, c, f, k, s, p = shape
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((n, d, h, w, c)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((k, k, k, c, f)), jnp.bfloat16)
    y = jax.jit(lambda x, kernel: onednn.conv(x, kernel, s, p))(x, kernel)
    assert y.dtype == jnp.bfloat16
    f32 = lambda x, kernel: conv_module._conv_native(x.astype(jnp.float32), kernel.astype(jnp.float32), s, p)
    ref = f32(x, kernel)
    cot = jnp.asarray(rng.standard_normal(y.shape), jnp.bfloat16)
    tol = lambda a: dict(rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(a))))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, **tol(ref))
    grads = jax.jit(jax.grad(lambda x, kernel: jnp.sum((onednn.conv(x, kernel, s, p) * cot).astype(jnp.float32)),
                             (0, 1)))(x, kernel)
    grads_ref = jax.grad(lambda x, kernel: jnp.sum(f32(x, kernel) * cot.astype(jnp.float32)), (0, 1))(x, kernel)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), **tol(g_ref))


@needs_library
def test_convs_run_from_several_threads_at_once():
    """XLA runs a cached primitive on whichever thread it likes, several at once (the CMFT step does): each call
    brings its own scratchpad, so the results stay exact (a primitive bound to its creating thread's scratchpad
    wrote out of bounds and crashed the demo)."""
    import concurrent.futures

    rng = np.random.default_rng(2)
    cases = []  # (operands, oneDNN gradient, native gradient)
    for n, d, c, f, k, s, p in [(1, 12, 8, 16, 3, 1, 1), (2, 10, 16, 8, 4, 2, 1), (1, 14, 4, 32, 3, 2, 1)]:
        x = jnp.asarray(rng.standard_normal((n, d, d, d, c)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((k, k, k, c, f)), jnp.float32)
        grad = lambda conv, s=s, p=p: jax.jit(jax.grad(lambda a, w: jnp.sum(conv(a, w, s, p) ** 2), (0, 1)))
        cases.append(((x, kernel), grad(onednn.conv), grad(conv_module._conv_native)))
    expected = [native(*args) for args, _, native in cases]

    def run(i):
        args, fast, _ = cases[i % len(cases)]
        return i % len(cases), jax.block_until_ready(fast(*args))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(run, range(48)))
    for i, grads in results:
        for g, g_ref in zip(grads, expected[i], strict=True):
            _close(g, g_ref)


def _hlo(impl, x, dtype=None):
    module = Conv3D(4, 3, 1, 1, impl, dtype)
    params = module.init(jax.random.key(0), x)
    return jax.jit(module.apply).lower(params, x).as_text(), module, params


@needs_library
def test_conv3d_runs_the_custom_call_except_inside_pure_xla():
    x = jnp.ones((1, 6, 6, 6, 2), jnp.float32)
    hlo, module, params = _hlo("onednn", x)
    assert "cmfl_onednn_conv_fwd" in hlo
    assert conv_module.resolve_conv_impl("onednn", "cpu") == "onednn"
    with conv_module.pure_xla():
        assert "cmfl_onednn_conv_fwd" not in _hlo("onednn", x)[0]
        assert "cmfl_onednn_conv_fwd" not in _hlo("auto", x)[0]
        assert conv_module.resolve_conv_impl("onednn", "cpu") == "cpu_fast"
    # bfloat16 only where this CPU runs oneDNN's bfloat16 convolutions
    assert ("cmfl_onednn_conv_fwd" in _hlo("onednn", x, jnp.bfloat16)[0]) == onednn.bf16_supported()
    _close(module.apply(params, x), module.clone(conv_impl="native").apply(params, x))


@needs_library
def test_the_gpu_and_tpu_programs_hold_no_custom_call():
    x = jnp.ones((1, 6, 6, 6, 2), jnp.float32)
    module = Conv3D(4, 3, 1, 1, "onednn")
    params = module.init(jax.random.key(0), x)
    for platforms in (("cuda",), ("tpu",)):
        text = jax.jit(module.apply).trace(params, x).lower(lowering_platforms=platforms).as_text()
        assert "cmfl_onednn" not in text


def _train_losses(impl, steps=20):
    model = UNet3D(2, base=4, depth=2, conv_impl=impl)
    x = jax.random.normal(jax.random.key(0), (2, 12, 8, 12, 2), jnp.float32)
    target = jnp.tanh(x[..., ::-1])
    params = UNet3D(2, base=4, depth=2, conv_impl="native").init(jax.random.key(1), x)["params"]
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply({"params": p}, x)[0] - target) ** 2))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state, losses = opt.init(params), []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return np.array(losses)


@needs_library
@pytest.mark.slow
def test_twenty_train_steps_give_the_same_losses():
    losses = {impl: _train_losses(impl) for impl in ("native", "cpu_fast", "onednn")}
    assert losses["native"][-1] < losses["native"][0]
    np.testing.assert_allclose(losses["onednn"], losses["native"], rtol=1e-4)
    np.testing.assert_allclose(losses["cpu_fast"], losses["native"], rtol=1e-4)


@pytest.mark.parametrize("how", ["env", "missing_library"])
def test_without_the_library_onednn_runs_cpu_fast_with_one_log_line(how, monkeypatch, caplog):
    monkeypatch.setattr(onednn, "_state", {})
    if how == "env":
        monkeypatch.setenv("CMFL_JAX_ONEDNN", "0")
    else:
        def missing():
            raise OSError("cmfl_jax/_onednn_conv*.so was not built")
        monkeypatch.setattr(onednn, "_library_path", missing)
    x = jax.random.normal(jax.random.key(0), (1, 6, 5, 4, 2), jnp.float32)
    with caplog.at_level(logging.WARNING):
        hlo, module, params = _hlo("onednn", x)
        _hlo("auto", x)
        assert conv_module.resolve_conv_impl("onednn", "cpu") == "cpu_fast"
        assert conv_module.resolve_conv_impl("auto", "cpu") == "cpu_fast"
    assert "cmfl_onednn" not in hlo
    lines = [r for r in caplog.records if "oneDNN convolutions unavailable" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert ("CMFL_JAX_ONEDNN=0" if how == "env" else "was not built") in lines[0].getMessage()
    y = module.apply(params, x)
    _close(y, module.clone(conv_impl="cpu_fast").apply(params, x), rtol=1e-6)


def _setup_module():
    spec = importlib.util.spec_from_file_location("cmfl_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_build_is_optional(monkeypatch, tmp_path):
    """No oneDNN wheel or CMFL_JAX_BUILD_ONEDNN=0: no extension; a failing compiler: the build goes on without it."""
    setuptools = pytest.importorskip("setuptools", reason="setup.py needs setuptools (the build backend's)")
    from setuptools.command.build_ext import build_ext

    setup = _setup_module()
    monkeypatch.setenv("CMFL_JAX_BUILD_ONEDNN", "0")
    assert setup.onednn_extensions() == []
    monkeypatch.setenv("CMFL_JAX_BUILD_ONEDNN", "1")
    monkeypatch.setattr(setup, "_dist_dir", lambda dist, tail: str(tmp_path))
    (ext,) = setup.onednn_extensions()
    assert ext.optional
    # The same extension, compiled with a compiler that fails (as on a machine without one): no error, no library.
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("CXX", "false")
    sources = [os.path.join(ROOT, src) for src in ext.sources]
    ext = setuptools.Extension(ext.name, sources, language="c++", optional=True)
    cmd = build_ext(setuptools.Distribution({"name": "probe", "ext_modules": [ext]}))
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "tmp")
    cmd.ensure_finalized()
    cmd.run()
    assert not list((tmp_path / "lib").rglob("*.so"))
