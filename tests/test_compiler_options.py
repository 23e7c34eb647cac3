"""XLA options per jitted function: the table's on the CPU only, and the steps and the window function take them."""

from __future__ import annotations

import jax
import pytest

from cmfl_jax import compiler_options as co
from cmfl_jax import sharding


def test_options_apply_on_the_cpu_only():
    assert set(co.CPU_OPTIONS) == {"cmft_step", "cmff_step", "unet_step", "window"}
    for name, options in co.CPU_OPTIONS.items():
        assert co.compiler_options(name, "cpu") == (options or None)
        assert co.compiler_options(name, "gpu") is None and co.compiler_options(name, "tpu") is None
    with pytest.raises(KeyError, match="no compiler options entry 'predict'"):
        co.compiler_options("predict", "cpu")


def test_the_ynn_switch_is_an_accepted_option_and_keeps_the_result():
    """The one option the table may set compiles, and changes a conv's result by float rounding at most."""
    x = jax.random.normal(jax.random.key(0), (1, 12, 12, 8))
    w = jax.random.normal(jax.random.key(1), (3, 3, 8, 4))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    plain = jax.jit(conv)(x, w)
    switched = jax.jit(conv, compiler_options=co.YNN_OFF)(x, w)
    assert jax.numpy.allclose(plain, switched, rtol=1e-5, atol=1e-5)


def test_jit_train_step_passes_the_table_entry(monkeypatch):
    seen = []
    real = jax.jit

    def recording(fn, **kwargs):
        seen.append(kwargs.get("compiler_options"))
        return real(fn, **kwargs)

    monkeypatch.setattr(co, "CPU_OPTIONS", {**co.CPU_OPTIONS, "cmff_step": dict(co.YNN_OFF)})
    monkeypatch.setattr(sharding.jax, "jit", recording)
    sharding.jit_train_step(lambda s, b, r: (s, {}), options="cmff_step")
    sharding.jit_train_step(lambda s, b, r: (s, {}))
    assert seen == [(co.YNN_OFF if jax.default_backend() == "cpu" else None), None]
