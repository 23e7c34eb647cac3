"""Data parallelism: a step on 4 (forced CPU) devices equals the 1-device step on the same global batch, and
its checkpoint restores in a 1-device process.

The device count of a process is fixed when JAX starts, so each side runs in its own subprocess
(``python -m tests.test_sharding <side> <dir>``); the test compares what they write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from experiments.programs import forced_host_devices_env

from .conftest import REPO

DEVICES = 4
PHASES = ("cmft", "cmff")
LR = 1e-4  # the smoke configs' Adam learning rates (cmft.g_lr, cmft.d_lr, cmff.lr)


def _env(devices: int, tmp) -> dict:
    # conftest's XLA flags and compilation cache are inherited
    return forced_host_devices_env(devices, {**os.environ, "CMFL_JAX_CACHE": str(tmp / "cache")})


def _run_side(side: str, devices: int, tmp) -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.test_sharding", side, str(tmp)], cwd=REPO,
                          env=_env(devices, tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_sharded_step_equals_one_device_step_and_its_checkpoint_restores(tmp_path):
    _run_side("sharded", DEVICES, tmp_path)
    _run_side("restore", 1, tmp_path)
    for phase in PHASES:
        with open(tmp_path / f"{phase}_report.json") as f:
            report = json.load(f)
        assert report["device_count"] == DEVICES
        assert report["batch_devices"] == DEVICES and report["batch_shard_shape"][0] == 1  # 1 sample per device
        assert report["params_replicated_on"] == DEVICES
        one, many, before = (np.load(tmp_path / f"{phase}_{k}.npz") for k in ("one", "sharded", "before"))
        assert set(one.files) == set(many.files) and len(one.files) > 30
        for net in {k.split("/")[0] for k in one.files}:
            _check_network(net, one, many, before)
        for name, (a, b) in report["metrics"].items():
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (phase, name, a, b)
        restored = np.load(tmp_path / f"{phase}_restored.npz")
        assert restored["_devices"] == 1
        for k in many.files:
            np.testing.assert_array_equal(restored[k], many[k], err_msg=f"{phase} restored {k}")


def _check_network(net: str, one, many, before) -> None:
    """Adam's moments (the all-reduced gradient and its square) agree; so do the params, but for gradients at
    rounding level.

    Adam's first step moves each param by lr * sign(gradient). A conv bias in front of an instance norm has a
    true gradient of 0, so its sign (and the param after the step) is set by rounding, which differs between
    one sum over the batch and an all-reduce of four: those elements may differ by up to 2 lr, no more.
    """
    keys = [k[len(net) + len("/params/"):] for k in one.files if k.startswith(f"{net}/params/")]
    scale = {m: max(np.abs(one[f"{net}/{m}/{k}"]).max() for k in keys) for m in ("mu", "nu")}
    assert scale["mu"] > 0
    moved = exempt = total = 0
    for k in keys:
        for m in ("mu", "nu"):
            np.testing.assert_allclose(many[f"{net}/{m}/{k}"], one[f"{net}/{m}/{k}"], rtol=0,
                                       atol=1e-5 * scale[m], err_msg=f"{net} {m} {k}")
        p_one, p_many = one[f"{net}/params/{k}"], many[f"{net}/params/{k}"]
        rounding = np.abs(one[f"{net}/mu/{k}"]) <= 1e-5 * scale["mu"]
        np.testing.assert_allclose(p_many[~rounding], p_one[~rounding], rtol=0, atol=1e-5, err_msg=f"{net} {k}")
        assert np.all(np.abs(p_many - p_one) <= 2 * LR + 1e-6), f"{net} {k}"
        moved += int(np.sum(p_one != before[f"{net}/params/{k}"]))
        exempt += int(rounding.sum())
        total += p_one.size
    assert exempt < 0.05 * total, (net, exempt, total)
    assert moved > 0.9 * total, (net, moved, total)  # the step did change the params


# ----------------------------------------------------------------------------------------- the subprocesses


def _config(phase: str):
    from cmfl_jax.config_variants import load_config

    config = load_config(f"{phase}:smoke")  # 32^3 patches, U-Net base 4, depth 2
    config.model.conv_impl = "native"
    lr = max(config.cmft.g_lr, config.cmft.d_lr) if phase == "cmft" else config.cmff.lr
    assert lr == LR, lr
    return config


def _states(phase: str, config, seed: int) -> dict:
    import jax

    from cmfl_jax.training import cmff_step, cmft_step

    if phase == "cmft":
        return cmft_step.create_states(jax.random.key(seed), config)
    return {"seg": cmff_step.create_state(jax.random.key(seed), config)}


def _batch(phase: str, n: int) -> dict:
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((n, 32, 32, 32, 4), dtype=np.float32)}
    if phase == "cmff":
        batch["label"] = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(n, 32, 32, 32))
    return batch


def _flat_params(states: dict) -> dict[str, np.ndarray]:
    """``net/params/...`` and Adam's moments ``net/mu/...``, ``net/nu/...`` (after one step: the gradient, squared)."""
    import jax
    from flax import traverse_util

    tree = {k: {"params": s.params, "mu": s.opt_state[0].mu, "nu": s.opt_state[0].nu} for k, s in states.items()}
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def sharded_side(out: str) -> None:
    """4 devices: the step on a 1-device mesh and on the 4-device mesh, same states and batch; save the latter."""
    import jax

    from cmfl_jax import checkpoints, sharding
    from cmfl_jax.training import cmff_step, cmft_step

    assert jax.device_count() == DEVICES, jax.devices()
    for phase in PHASES:
        config = _config(phase)
        make_step = (cmft_step if phase == "cmft" else cmff_step).make_train_step
        batch = _batch(phase, DEVICES)
        results = {}
        for name, mesh in (("one", sharding.make_mesh(jax.devices()[:1])), ("sharded", sharding.make_mesh())):
            states = sharding.replicate(_states(phase, config, 0), mesh)
            if name == "one":
                np.savez(os.path.join(out, f"{phase}_before.npz"), **_flat_params(states))
            global_batch = sharding.shard_batch(batch, mesh)
            states, metrics = make_step(config, mesh)(states, global_batch)
            results[name] = states, {k: float(v) for k, v in metrics.items()}
            np.savez(os.path.join(out, f"{phase}_{name}.npz"), **_flat_params(states))
        states = results["sharded"][0]
        leaf = jax.tree.leaves(states)[0]
        report = {
            "device_count": jax.device_count(),
            "batch_devices": len(global_batch["image"].sharding.device_set),
            "batch_shard_shape": list(global_batch["image"].addressable_shards[0].data.shape),
            "params_replicated_on": len(leaf.sharding.device_set) if leaf.sharding.is_fully_replicated else 0,
            "metrics": {k: [results["one"][1][k], v] for k, v in results["sharded"][1].items()},
        }
        with open(os.path.join(out, f"{phase}_report.json"), "w") as f:
            json.dump(report, f)
        manager = checkpoints.make_manager(os.path.join(out, phase))
        checkpoints.save(manager, 1, states, {"step": 1}, force=True)
        checkpoints.close(manager)


def restore_side(out: str) -> None:
    """1 device: restore each phase's sharded checkpoint onto freshly made (other seed) states."""
    import jax

    from cmfl_jax import checkpoints

    for phase in PHASES:
        manager = checkpoints.make_manager(os.path.join(out, phase), read_only=True)
        restored, meta = checkpoints.restore(manager, _states(phase, _config(phase), 123))
        manager.close()
        assert meta["step"] == 1
        np.savez(os.path.join(out, f"{phase}_restored.npz"), _devices=jax.device_count(), **_flat_params(restored))


if __name__ == "__main__":
    {"sharded": sharded_side, "restore": restore_side}[sys.argv[1]](sys.argv[2])
