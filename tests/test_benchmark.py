"""The benchmark measures what it says, and its PyTorch twin computes the same function as UNet3D."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax.models import UNet3D
from experiments import benchmark, harness, programs

TINY = dict(size=16, base=4, depth=2, repeats=2, warmup=1, seed=0)


@pytest.mark.slow
def test_jax_case_record():
    record = harness.run_case(benchmark.RUNNERS, dict(kind="jax_unet", impl="cpu_fast", dtype="float32", **TINY))
    assert record["status"] == "ok", record.get("error")
    for part in ("train", "forward"):
        assert len(record[part]["times_s"]) == 2
        assert 0 < record[part]["min_s"] <= record[part]["median_s"]
        assert record[part]["first_s"] > 0
    assert record["compile_train_s"] > 0 and record["compile_forward_s"] > 0
    assert record["peak_rss_mib"] >= record["baseline_rss_mib"] > 0
    assert record["num_params"] == 21640  # UNet3D(4, base=4, depth=2)
    assert np.isfinite(record["loss_first"]) and 0 < record["loss_first"] < 1
    assert {"size", "impl", "dtype", "repeats_run", "xla_train_memory"} <= set(record)
    memory = record["xla_train_memory"]
    assert memory["total_mib"] == pytest.approx(memory["temp_mib"] + memory["argument_mib"] + memory["output_mib"]
                                                - memory["alias_mib"]) and memory["temp_mib"] > 0


def test_failed_case_is_recorded_not_raised():
    record = harness.run_case_subprocess("experiments.benchmark", dict(kind="no_such_kind", impl="-", dtype="-",
                                                                       **TINY), timeout=60)
    assert record["status"] == "failed" and "no_such_kind" in record["error"] and record["wall_s"] > 0


def _ok(kind, impl, train, forward, size=16):
    return dict(kind=kind, impl=impl, dtype="float32", status="ok", compile_train_s=None, compile_forward_s=None,
                train={"median_s": train}, forward={"median_s": forward}, peak_rss_mib=10.0, baseline_rss_mib=5.0,
                memory_format=impl.split("/")[-1], **{**TINY, "size": size})


def test_table_ratios_against_faster_torch_format():
    records = [_ok("torch_unet", "eager/contiguous", 2.0, 1.0), _ok("torch_unet", "eager/channels_last_3d", 1.0, 4.0),
               {**_ok("jax_unet", "cpu_fast", 0.5, 2.0), "compile_train_s": 3.0, "compile_forward_s": 1.0},
               dict(kind="jax_unet", impl="native", dtype="float32", status="failed", error="MemoryError: x", **TINY)]
    assert benchmark.torch_references(records)[(16, 4, 2)] is records[1]
    rows = benchmark.unet_table(records).splitlines()
    assert "| 0.50 | 0.50 |" in rows[4]  # train 0.5 / 1.0, forward 2.0 / 4.0
    assert "PyTorch reference" in rows[3] and "| 2.00 | 0.25 |" in rows[2]
    assert "FAILED: MemoryError: x" in rows[5]


def test_torch_twin_matches_unet3d():
    torch = pytest.importorskip("torch")
    from cmfl_jax.losses import soft_dice_loss as jax_soft_dice_loss
    from experiments.torch_unet import TorchUNet3D, load_flax_params, num_params, soft_dice_loss

    model = UNet3D(4, base=4, depth=2, conv_impl="native")
    params = programs.random_unet_params(model, seed=1, noise=0.1)  # no 0/1 biases and scales: each copy counts
    twin = TorchUNet3D(2, 4, base=4, depth=2)
    assert num_params(twin) == sum(v.size for v in jax.tree.leaves(params))
    load_flax_params(twin, params)
    x, y = programs.unet_inputs(16, seed=3)
    expected = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x))[0])
    with torch.inference_mode():
        got = twin(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())).numpy().transpose(0, 2, 3, 4, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    probs = jax.nn.softmax(jnp.asarray(expected), axis=-1)
    torch_loss = soft_dice_loss(torch.from_numpy(np.asarray(probs).transpose(0, 4, 1, 2, 3).copy()),
                                torch.from_numpy(y.transpose(0, 4, 1, 2, 3).copy()))
    np.testing.assert_allclose(float(torch_loss), float(jax_soft_dice_loss(probs, jnp.asarray(y))), rtol=1e-6)


def test_volume_table_gives_seconds_per_subject_and_ratio_to_monai():
    def record(kind, impl, mirror, seconds):
        return {"kind": kind, "impl": impl, "mirror": mirror, "status": "ok", "compile_s": None if kind ==
                "monai_volume" else 5.0, "volume": {"median_s": seconds}, "peak_rss_mib": 1000.0}

    rows = benchmark.volume_table([record("monai_volume", "monai", False, 60.0),
                                   record("jax_volume", "cpu_fast", False, 45.0),
                                   record("jax_volume", "cpu_fast", True, 360.0)]).splitlines()
    assert rows[2] == "| torch | monai | no | - | 60 | 1000 | 1.00 |"
    assert rows[3] == "| jax | cpu_fast | no | 5 | 45 | 1000 | 0.75 |"
    assert rows[4] == "| jax | cpu_fast | 8 flips | 5 | 360 | 1000 | 6.00 |"


@pytest.mark.slow
def test_devices_case_runs_on_forced_host_devices():
    args = benchmark.parse_args(["--suite", "devices", "--devices", "2", "--sizes", "16", "--base", "2", "--depth",
                                 "2", "--impls", "native", "--dtypes", "float32", "--repeats", "1", "--warmup", "0"])
    (case,) = benchmark.devices_cases(args, with_torch=False)
    from experiments.programs import forced_host_devices_env

    record = harness.run_case_subprocess("experiments.benchmark", case, 300, forced_host_devices_env(2, os.environ))
    assert record["status"] == "ok", record.get("error")
    assert record["device_count"] == record["batch_devices"] == 2 and record["global_batch"] == 2
    assert record["steps_per_s"] == pytest.approx(1 / record["train"]["median_s"])
    assert record["samples_per_s"] == pytest.approx(2 * record["steps_per_s"])
    assert np.isfinite(record["loss_first"]) and record["xla_train_memory"]["temp_mib"] > 0
    rows = benchmark.devices_table([record, {**case, "devices": 4, "status": "failed", "error": "OOM"}]).splitlines()
    assert rows[2].startswith("| cmff | 16^3 | 2/2 | native | float32 | 2 | 2 |")
    assert "FAILED: OOM" in rows[3] and "not a speed-up" in rows[-1]


def test_goal_table_has_one_row_per_goal_with_the_fastest_jax_case():
    records = [_ok("torch_unet", "eager/contiguous", 2.0, 1.0), _ok("jax_unet", "native", 3.0, 1.0),
               _ok("jax_unet", "cpu_fast", 1.5, 1.0), _ok("torch_unet", "eager/contiguous", 8.0, 1.0, size=32),
               _ok("jax_unet", "cpu_fast", 10.0, 1.0, size=32),
               {"kind": "monai_volume", "impl": "monai", "mirror": False, "status": "ok", "compile_s": None,
                "volume": {"median_s": 60.0}, "peak_rss_mib": 1.0},
               {"kind": "jax_volume", "impl": "cpu_fast", "mirror": False, "status": "ok", "compile_s": 2.0,
                "volume": {"median_s": 75.0}, "peak_rss_mib": 1.0}]
    rows = benchmark.goal_table(records).splitlines()
    assert rows[2] == "| train step 16^3 | 2 | 1.5 (cpu_fast, float32) | 0.75 |"  # 1.5 / 2.0, not native's 3.0
    assert rows[3] == "| train step 32^3 | 8 | 10 (cpu_fast, float32) | 1.25 |"
    assert rows[4] == "| full volume 240x240x155 | 60 | 75 (cpu_fast, float32) | 1.25 |"
    args = benchmark.parse_args(["--suite", "goal", "--sizes", "64", "--impls", "cpu_fast", "--dtypes", "float32"])
    cases = benchmark.goal_cases(args, with_torch=True)
    assert [c["kind"] for c in cases] == ["torch_unet", "torch_unet", "jax_unet", "monai_volume", "jax_volume"]
    assert all(c["repeats"] == 1 and c["warmup"] == 0 and not c["mirror"] for c in cases[3:])


@pytest.mark.slow
def test_volume_case_times_plain_and_mirrored_sliding_window():
    args = benchmark.parse_args(["--suite", "volume", "--base", "2", "--depth", "2", "--impls", "cpu_fast",
                                 "--repeats", "1", "--warmup", "0"])
    cases = benchmark.volume_cases(args, with_torch=True)
    assert [(c["kind"], c["mirror"]) for c in cases] == [("monai_volume", False), ("jax_volume", False),
                                                         ("jax_volume", True)]
    assert cases[1]["volume"] == (240, 240, 155) and cases[1]["window"] == 128
    plain, mirrored = (harness.run_case(benchmark.RUNNERS, {**c, "volume": [32, 16, 12], "window": 16})
                       for c in cases[1:])
    for record in (plain, mirrored):
        assert record["status"] == "ok", record.get("error")
        assert record["windows"] == 3 and record["compile_s"] > 0 and record["volume"]["median_s"] > 0
    assert mirrored["volume"]["median_s"] > plain["volume"]["median_s"]  # 8 forward passes per window


def test_xla_flops_of_a_tiny_unet_step_match_the_hand_count():
    """XLA counts 2 FLOPs per multiply-add of its convolutions, leaving out the taps in the zero padding: one conv and
    one transposed conv exactly (plus their bias adds); the whole U-Net within the element-wise ops the hand count
    leaves out (bias, instance norm, leaky ReLU, pooling, softmax, Dice, Adam): forward 0-6 %, train step 0-8 % at
    16^3, base 4, where they weigh most (2 x 27 x C_in x C_out per voxel of a conv against a few per voxel of each)."""
    from cmfl_jax.models.conv import Conv3D, UpConv3D
    from experiments.pipeline_balance import unet_conv_flops, unet_train_flops

    def flops(fn, *args):
        return programs.xla_flops(jax.jit(fn).lower(*args).compile())

    x = jnp.ones((1, 16, 16, 16, 4))
    for module, expected in ((Conv3D(8, 3, 1, 1, "native"), 2 * 4 * 8 * (3 * 16 - 2) ** 3 + 16**3 * 8),
                             (UpConv3D(8, "native"), 2 * 8 * 4 * 8 * 16**3 + 32**3 * 8)):
        assert flops(module.apply, module.init(jax.random.key(0), x), x) == expected
    state, x, y, train_step, forward = programs.unet_functions(dict(TINY, impl="native", dtype="float32"))
    hand_forward, first = unet_conv_flops(16, 2, 4, base=4, depth=2, padded=True)
    assert hand_forward == 21441920 and first == 2 * 2 * 4 * 46**3  # by hand: 46 = 3 x 16 - 2 taps per axis
    assert 1.0 <= flops(forward, state.params, x) / hand_forward <= 1.06
    assert 1.0 <= flops(train_step, state, x, y) / unet_train_flops(16, 2, 4, 4, 2, padded=True) <= 1.08
    assert unet_train_flops(128, 2, 4, 16, 4) == pytest.approx(0.7186e12, rel=1e-4)  # the paper's U-Net at 128^3


def _patches(size, augment, where, workers, per_s, status="ok"):
    return dict(kind="patches", size=size, augment=augment, where=where, workers=workers, status=status,
                patches_per_s=per_s, subjects=4, peak_rss_mib=300.0, reason="not available: no where")


def test_pipeline_table_rows_and_the_balance():
    records = [_patches(64, "none", "host", 1, 100.0), _patches(128, "nnunet", "host", 2, 2.0),
               _patches(128, "nnunet", "device", 1, None, "skipped"),
               dict(kind="flops", job="cmff", size=64, status="ok", flops=0.25e12, unets_hand_flops=0.18e12,
                    compile_s=9.0, backend="cpu"),
               dict(kind="flops", job="cmff", size=128, status="ok", flops=2e12, unets_hand_flops=1.44e12,
                    compile_s=90.0, backend="cpu"),
               dict(kind="flops", job="cmft", size=128, status="ok", flops=4e12, unets_hand_flops=None,
                    compile_s=99.0, backend="cpu")]
    lines = benchmark.SUITES["pipeline"][1](records).splitlines()
    assert "| 64^3 | none | host | 1 | 100 | 0.01 | 4 | 300 |  |" in lines
    assert "| 128^3 | nnunet | device | 1 | - | - | - | - | SKIPPED: not available: no where |" in lines
    assert "| cmff | 128^3 | 2.000 | 1.440 | 90 |" in lines and "| cmft | 128^3 | 4.000 | - | 99 |" in lines
    # A100 at 30 %: 312e12 x 0.3 / 0.25e12 = 374 steps/s at 64^3; / 2e12 (cmff, the lighter) = 46.8 at 128^3
    assert "| A100 | bfloat16 | 312 | 30% | 374 | 46.8 |" in lines
    balance = [line for line in lines if line.startswith("| 64^3 | none | host | 1 | 100 |")][-1].split(" | ")
    # T4 30 %: 65e12 x 0.3 / 0.25e12 = 78 patches/s needed, 100 made; T4 50 %: 130 needed
    assert balance[5:7] == ["keeps up", "limits by 1.3x"]
    balance = [line for line in lines if line.startswith("| 128^3 | nnunet | host | 2 | 2 |")][-1].split(" | ")
    assert balance[-1] == f"limits by {989e12 * 0.5 / 2e12 / 2.0:.1f}x |"  # H100 50 %: 247 needed, 2 made


@pytest.mark.slow
def test_pipeline_case_times_the_training_patches(monkeypatch):
    """The pipeline suite's cases, and one run on the smoke data: 1 worker, 3 timed batches after those grain
    holds ready; the device variant is skipped while the release has no augment.where."""
    from experiments import pipeline_balance

    args = benchmark.parse_args(["--suite", "pipeline", "--sizes", "32", "--workers", "1", "--patches", "3"])
    cases = pipeline_balance.pipeline_cases(args)
    assert [(c["kind"], c.get("augment"), c.get("where"), c.get("job")) for c in cases] == [
        ("patches", "none", "host", None), ("patches", "nnunet", "host", None), ("patches", "nnunet", "device", None),
        ("flops", None, None, "cmff"), ("flops", None, None, "cmft")]
    if not pipeline_balance.where_known():
        assert pipeline_balance.skip(cases[2]).startswith("not available")
    record = harness.run_case(benchmark.RUNNERS, {**cases[1], "config": "configs/cmff.py:smoke"})
    assert record["status"] == "ok", record.get("error")
    times = record["timing"]["times_s"]
    assert len(times) == 3 and record["patches_per_s"] == pytest.approx(3 / sum(times))
    assert record["warmup_batches"] == 1 + 2 + 1 and record["subjects"] == 4  # warm-up, read-ahead, the worker's


def test_step_split_table_gives_each_part_against_the_step_and_the_ratio_of_the_data_sets():
    from experiments import step_split

    medians = {"data": {p: 0.002 for p in step_split.LABELS}, "synthetic": {p: 0.001 for p in step_split.LABELS}}
    medians["data"].update(step=2.0, step_cpu=1.5)
    medians["synthetic"].update(step=1.0, step_cpu=1.0)
    record = dict(kind="step_split", status="ok", config=step_split.CONFIG, median_s=medians, steps_run=24,
                  subjects={"data": 12, "synthetic": 12}, compile_s=30.0, read_ahead_mib={"data": 17, "synthetic": 12})
    lines = step_split.split_table([record]).splitlines()
    assert "| label window (blosc2 decompression) | 2 | 1 | 0.10% | 0.10% | 2.00 |" in lines  # 2 ms of 2 s; 1 of 1
    assert "| jitted train step (CPU s, all threads) | 1.5e+03 | 1e+03 | 75.00% | 100.00% | 1.50 |" in lines
    assert "| grain read-ahead (RSS after 1 batch + 2 s, MiB) | 17 | 12 |  |  |  |" in lines
    args = benchmark.parse_args(["--suite", "step_split", "--data", "/brats", "--steps", "8"])
    (case,) = step_split.split_cases(args)
    assert case["sets"] == {"data": {"data.root": "/brats"}, "synthetic": step_split.SYNTHETIC} and case["steps"] == 8


@pytest.mark.slow
def test_step_split_case_times_every_part_on_two_data_sets():
    from experiments import step_split

    case = dict(kind="step_split", config="configs/cmff.py:smoke", steps=4, seed=0,
                sets={"a": {}, "b": {"data.synthetic.seed": 1}})
    record = harness.run_case(step_split.RUNNERS, case)
    assert record["status"] == "ok", record.get("error")
    assert record["steps_run"] == 4 and record["subjects"] == {"a": 4, "b": 4}
    for name in ("a", "b"):
        times, medians = record["times_s"][name], record["median_s"][name]
        assert len(times["step"]) == 4 and len(times["label_window"]) == 4
        assert medians["step"] == pytest.approx(float(np.median(times["step"])))
        assert all(v > 0 for v in medians.values()), medians
        assert record["read_ahead_mib"][name] < 64  # 2 patches of 32^3 ahead, not grain's 500
