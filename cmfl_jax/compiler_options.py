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

# function -> XLA options on the CPU. Chosen by experiments/results/xla_options.md (2-core AMD EPYC, one run,
# candidates timed in turn): see that table for the figures behind each choice.
CPU_OPTIONS: dict[str, dict[str, str]] = {
    "cmft_step": {},
    "cmff_step": {},
    "unet_step": {},
    "window": {},
}


def compiler_options(function: str, backend: str | None = None) -> dict[str, str] | None:
    """The options of ``function`` (a key of ``CPU_OPTIONS``) for ``jax.jit``'s ``compiler_options``: the table's
    on the CPU backend, None (XLA's defaults) on any other or when the table has none."""
    if function not in CPU_OPTIONS:
        raise KeyError(f"no compiler options entry {function!r}; known: {', '.join(CPU_OPTIONS)}")
    if (backend or jax.default_backend()) != "cpu":
        return None
    return dict(CPU_OPTIONS[function]) or None
