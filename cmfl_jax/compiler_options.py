"""XLA compiler options per jitted function, applied on the CPU only (GPU and TPU keep XLA's defaults).

XLA's CPU backend hands convolutions and matrix products to YNNPACK by default. That is not the faster
library for every function here: PERF.md measured a lone 3x3 2D convolution at 153 ms through YNNPACK and
15 ms through Eigen, while CMFT's PatchGAN gains from it. ``jax.jit(f, compiler_options=...)`` sets XLA's
debug options for one compiled function, so each function gets the options measured fastest for it.

``CPU_OPTIONS`` is the one table; each entry names the measurement that chose it
(``python -m experiments.xla_options``, table in ``experiments/results/xla_options.md``). The options change
which library computes a convolution, so results differ from the defaults by float rounding only.
"""

from __future__ import annotations

import jax

YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}  # Eigen convolutions and dots instead of YNNPACK

# function -> XLA options on the CPU, chosen by experiments/results/xla_options.md (2 CPU cores, each function's
# candidates timed in turn, 5 calls each; median s per call with defaults / without YNNPACK / YNNPACK dots only;
# the two steps again on an idle machine, experiments/results/xla_options_idle.md):
CPU_OPTIONS: dict[str, dict[str, str]] = {
    "cmft_step": {},  # cmft.py:cpu64, 64^3: 12.4 / 14.4 / 14.9 s
    "cmff_step": {},  # cmff.py:cpu, 64^3: 4.43 / 5.53 / 5.64 s; idle: 1.58 / 1.82 / 1.81 s
    "unet_step": {},  # benchmark U-Net, 64^3: 3.91 / 4.00 / 4.67 s; idle: 1.40 / 1.57 / 1.55 s
    "window": {},  # the paper's CMFF network, one 128^3 window: 15.8 / 15.8 / 16.2 s (no YNNPACK 0.99x: noise)
}


def compiler_options(function: str, backend: str | None = None) -> dict[str, str] | None:
    """The options of ``function`` (a key of ``CPU_OPTIONS``) for ``jax.jit``'s ``compiler_options``: the table's
    on the CPU backend, None (XLA's defaults) on any other or when the table has none."""
    if function not in CPU_OPTIONS:
        raise KeyError(f"no compiler options entry {function!r}; known: {', '.join(CPU_OPTIONS)}")
    if (backend or jax.default_backend()) != "cpu":
        return None
    return dict(CPU_OPTIONS[function]) or None
