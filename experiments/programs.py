"""The JAX programs the experiments measure, built and timed in the harness's child process: the train step of a
job config (``configs/cmff.py``, ``configs/cmft.py``) on N devices, full-volume sliding-window inference, and the
benchmark's plain U-Net (the PyTorch twin's counterpart). A case names its config as ``--config=`` does
(``configs/cmff.py:smoke``), with dotted overrides (``{"model.base": 8}``).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np

from experiments import harness

SEED = 0
NUM_CLASSES = 4
UNET_CHANNELS = 2  # the U-Net benchmark's input: one modality pair
LEARNING_RATE = 1e-4
LOSS_KEYS = {"cmff": "loss", "cmft": "g_total"}


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> Any:
    """``configs/<job>.py[:variant]`` read as ``python -m cmfl_jax.main --config=`` reads it, then ``overrides``."""
    from cmfl_jax.config_variants import load_config as load
    from cmfl_jax.config_variants import override

    config = load(os.path.join(harness.REPO, spec))
    override(config, {k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()})
    return config


def forced_host_devices_env(devices: int, env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process whose CPU backend has ``devices`` devices (fixed when JAX starts, so tests and
    benchmarks set it per subprocess); ``XLA_FLAGS`` keeps its other flags."""
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}


def job_step(config: Any, mesh: Any) -> tuple[Any, dict, dict]:
    """(the job's jitted train step, its states replicated on ``mesh``, a random batch split over it: images and
    labels in 0/1/2/4, as timing does not depend on them)."""
    import jax

    from cmfl_jax import sharding
    from cmfl_jax.training import cmff_step, cmft_step

    module = cmff_step if config.job == "cmff" else cmft_step
    states = module.create_states(jax.random.key(SEED), config)
    shape, rng = (mesh.size * config.train.batch_size, *config.data.patch_size), np.random.default_rng(SEED)
    batch = {"image": rng.standard_normal((*shape, 4), dtype=np.float32),
             "label": rng.choice(np.array((0, 1, 2, 4), np.uint8), size=shape)}
    return module.make_train_step(config, mesh), sharding.replicate(states, mesh), sharding.shard_batch(batch, mesh)


def xla_flops(compiled: Any) -> float | None:
    """FLOPs of a compiled function by XLA's cost analysis (a dict, or a list of one per program), None where the
    backend does not say. Its own convolutions count 2 per multiply-add; a custom call (oneDNN) counts nothing."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:
        return None
    analysis = analysis[0] if isinstance(analysis, list | tuple) and analysis else analysis
    return float(analysis["flops"]) if isinstance(analysis, dict) and "flops" in analysis else None


def compile_and_time(fn: Any, args: tuple, repeats: int, warmup: int, donated: bool = True,
                     loss: Any = None) -> tuple[dict[str, Any], list[float]]:
    """Cold compile of jitted ``fn`` on ``args``, XLA's buffer sizes and FLOPs, then ``warmup`` + ``repeats`` calls
    (none for 0 repeats), each on the last call's first output where ``donated``; (figures, ``loss`` of each call's
    output)."""
    import jax

    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    figures = {"compile_s": time.perf_counter() - t0, "xla_memory": harness.memory_analysis(compiled),
               "flops": xla_flops(compiled), "timing": None}
    holder, losses = list(args), []

    def once():
        out = jax.block_until_ready(compiled(*holder))
        holder[0] = out[0] if donated else holder[0]
        losses.extend([float(loss(out))] if loss else [])

    return {**figures, "timing": harness.measure(once, repeats, warmup) if repeats else None}, losses


def run_step(case: dict[str, Any]) -> dict[str, Any]:
    """The job's train step on the first ``devices`` devices: cold compile, XLA's buffer sizes, then (``repeats``
    > 0) warm-up and timed steps; peak memory."""
    import jax

    from cmfl_jax import sharding

    if jax.device_count() < case["devices"]:
        raise RuntimeError(f"expected {case['devices']} devices, JAX has {jax.device_count()}")
    baseline = harness.current_rss_mib()
    config = load_config(case["config"], case.get("overrides"))
    step, states, batch = job_step(config, sharding.make_mesh(jax.devices()[: case["devices"]]))
    figures, losses = compile_and_time(step, (states, batch), case["repeats"], case["warmup"],
                                       loss=lambda out: out[1][LOSS_KEYS[config.job]])
    n, train = int(batch["image"].shape[0]), figures["timing"]
    record = {"device_count": jax.device_count(), "global_batch": n, "baseline_rss_mib": baseline,
              "batch_devices": len(batch["image"].sharding.device_set), "compile_train_s": figures["compile_s"],
              "xla_train_memory": figures["xla_memory"], "xla_flops": figures["flops"], "train": train}
    if train:
        record.update(steps_per_s=1.0 / train["median_s"], samples_per_s=n / train["median_s"],
                      loss_first=losses[0], loss_last=losses[-1])
    return {**record, "peak_rss_mib": harness.peak_rss_mib(), "memory": harness.memory_figures()}


def random_unet_params(model: Any, seed: int, noise: float = 0.0) -> Any:
    """Params of a flax ``UNet3D`` from :func:`cmfl_jax.models.init_params` (no compiled ``model.init``); ``noise``
    adds that many standard normals to every bias and norm scale (so that a mis-copied one shows in a test)."""
    import jax
    import jax.numpy as jnp

    from cmfl_jax.models import init_params

    small = 2**model.depth  # conv params do not depend on the spatial size
    params = init_params(model, jax.random.key(seed),
                         jax.ShapeDtypeStruct((1, small, small, small, UNET_CHANNELS), jnp.float32))
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        if path[-1].key == "kernel" or not noise:
            return leaf
        return leaf + jnp.asarray(noise * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(perturb, params)


def unet_inputs(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random input ``(1, S, S, S, 2)`` and one-hot label ``(1, S, S, S, 4)``, channels last, float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, size, size, size, UNET_CHANNELS), dtype=np.float32)
    y = np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, (1, size, size, size))]
    return x, y


def unet_functions(case: dict[str, Any]) -> tuple[Any, Any, Any, Any, Any]:
    """``UNet3D(4, base, depth, conv_impl, dtype)`` of ``case``: (train state, x, y, train step, forward), the two
    functions not yet jitted; the step is softmax + soft Dice against a fixed random one-hot label, Adam 1e-4."""
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
            return soft_dice_loss(jax.nn.softmax(state.apply_fn({"params": params}, x)[0], axis=-1), y)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    def forward(params, x):
        return model.apply({"params": params}, x)[0]

    return state, x, y, train_step, forward


def run_volume(case: dict[str, Any]) -> dict[str, Any]:
    """Seconds per subject of ``sliding_window`` over a random ``volume`` (``window`` cubes, 50 % overlap, Gaussian
    weighting, one window per call), plain or mirrored (8 flips through the one compiled plain function), of the
    case's network: the benchmark's U-Net (``net`` "unet") or the CMFF network of ``config``."""
    import jax
    import jax.numpy as jnp

    from cmfl_jax.inference.sliding_window import cmff_predict_fn, mirrored, sliding_window, window_starts
    from cmfl_jax.models import UNet3D, builder

    baseline = harness.current_rss_mib()
    if case["net"] == "unet":
        model = UNet3D(NUM_CLASSES, base=case["base"], depth=case["depth"], conv_impl=case["impl"])
        fn = jax.jit(lambda params, x: jax.nn.softmax(model.apply({"params": params}, x)[0], axis=-1))
        params, channels = random_unet_params(model, case["seed"]), UNET_CHANNELS
    else:
        config = load_config(case["config"], case.get("overrides"))
        model = builder.cmff_net(config.model)
        fn, params = cmff_predict_fn(model, config.data.pairing), builder.random_params(model, jax.random.key(SEED))
        channels = 4
    window = (case["window"],) * 3
    t0 = time.perf_counter()
    compiled = fn.lower(params, jnp.zeros((1, *window, channels), jnp.float32)).compile()
    compile_s = time.perf_counter() - t0
    image = np.random.default_rng(case["seed"]).standard_normal((*case["volume"], channels), dtype=np.float32)
    plain = lambda x: np.asarray(compiled(params, x))
    predict = mirrored(plain) if case["mirror"] else plain
    timing = harness.measure(lambda: sliding_window(predict, image, window, 0.5, 1, "gaussian"), case["repeats"],
                             case["warmup"])
    windows = math.prod(len(window_starts(max(s, window[0]), window[0], 0.5)) for s in case["volume"])
    return {"baseline_rss_mib": baseline, "compile_s": compile_s, "volume": timing, "windows": windows,
            "xla_memory": harness.memory_analysis(compiled), "peak_rss_mib": harness.peak_rss_mib(),
            "memory": harness.memory_figures()}
