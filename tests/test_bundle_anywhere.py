"""A bundle runs anywhere: its StableHLO is exported for cpu, cuda and tpu with a symbolic batch, and runs with JAX
alone (no model code, no Flax) giving the Flax model's probabilities; predict can use it in place of the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import nibabel as nib
import numpy as np
import pytest

from cmfl_jax import checkpoints
from cmfl_jax.config_variants import load_config
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.bundle import export_bundle, parse_platforms, stablehlo_name
from cmfl_jax.inference.predictor import load_bundle, load_workdir
from cmfl_jax.inference.stablehlo import load_stablehlo_predictor
from cmfl_jax.jobs.predict import run as run_predict
from cmfl_jax.training.cmff_step import create_state

from .conftest import REPO, write_tiny_dataset
from .test_cmff_train import tiny_cmff_config

WINDOW = (16, 16, 16)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A CMFF workdir as training leaves it (config.json, a ``best`` checkpoint), of a freshly initialised tiny
    network with conv_impl "auto" (so the export carries both conv paths); nothing is trained or compiled."""
    workdir = tmp_path_factory.mktemp("cmff_auto")
    config = tiny_cmff_config(workdir / "no_data", **{"init.mode": "random"})
    config.model.conv_impl = "auto"
    assert tuple(config.data.patch_size) == WINDOW
    state = create_state(jax.random.key(3), config, resuming=True)
    manager = checkpoints.make_manager(str(workdir), subdir="best")
    checkpoints.save(manager, 2, {"seg": state}, {"step": 2, "val": {"mean_dice": 0.5}}, force=True)
    checkpoints.close(manager)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    return workdir


@pytest.fixture(scope="module")
def bundle(workdir, tmp_path_factory):
    return export_bundle(str(workdir), str(tmp_path_factory.mktemp("export") / "bundle"), "best")


# Run in a fresh interpreter: JAX (and this package's StableHLO loader) only; what it imported is reported.
CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    bundle, inputs, outputs = sys.argv[1:4]
    with open(f"{bundle}/{json.load(open(f'{bundle}/bundle.json'))['stablehlo']}", "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    data = np.load(inputs)
    out = {f"y{b}": np.asarray(exported.call(data[f"x{b}"])) for b in (1, 3)}
    from cmfl_jax.inference.stablehlo import load_stablehlo_predictor
    out["volume"] = load_stablehlo_predictor(bundle).probabilities(data["volume"], batch_size=3)
    np.savez(outputs, **out)
    print(json.dumps({"platforms": list(exported.platforms), "in": str(exported.in_avals[0]),
                      "models": sorted(m for m in sys.modules if m.startswith("cmfl_jax.models")),
                      "flax": "flax" in sys.modules}))
""")


def test_stablehlo_runs_with_jax_alone_on_batch_1_and_3(bundle, workdir, tmp_path):
    with open(os.path.join(bundle, "bundle.json")) as f:
        info = json.load(f)
    assert info["platforms"] == ["cpu", "cuda", "tpu"] and info["batch"] == "symbolic" and info["format"] == 2
    assert info["stablehlo"] == stablehlo_name(WINDOW) and info["step"] == 2
    rng = np.random.default_rng(0)
    inputs = {"x1": rng.normal(size=(1, *WINDOW, 4)), "x3": rng.normal(size=(3, *WINDOW, 4)),
              "volume": rng.normal(size=(20, 22, 24, 4))}
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    np.savez(tmp_path / "in.npz", **inputs)
    child = subprocess.run([sys.executable, "-c", CHILD, bundle, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                           cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["models"] == [] and report["flax"] is False, report
    assert {"cpu", "cuda", "tpu"} <= set(report["platforms"]) and report["in"] == "float32[b,16,16,16,4]"
    got = np.load(tmp_path / "out.npz")
    flax = load_workdir(str(workdir), "best")  # the Flax model, in this process
    for b in (1, 3):
        x = inputs[f"x{b}"]
        want = np.asarray(flax.model.apply({"params": flax.params}, x[..., :2], x[..., 2:])["probs"])
        assert got[f"y{b}"].shape == (b, *WINDOW, 4)
        np.testing.assert_allclose(got[f"y{b}"], want, rtol=1e-5, atol=1e-5)
    assert np.ptp(got["y3"][..., 0]) > 1e-3  # not a constant output: the comparison means something
    np.testing.assert_allclose(got["volume"], flax.probabilities(inputs["volume"]), rtol=1e-5, atol=1e-5)


def test_predict_with_use_stablehlo_equals_the_params_path(bundle, tmp_path, monkeypatch):
    write_tiny_dataset(tmp_path / "data", n=1)
    outs = {}
    for use_stablehlo in (False, True):
        config = load_config("predict")
        config.model_dir, config.data.root, config.use_stablehlo = bundle, str(tmp_path / "data"), use_stablehlo
        config.save_probabilities, config.batch_size = True, 3 if use_stablehlo else 1
        config.out_dir = str(tmp_path / f"stablehlo_{use_stablehlo}")
        if use_stablehlo:  # the StableHLO path must never rebuild the Flax model
            from cmfl_jax.models import builder

            monkeypatch.setattr(builder, "cmff_net", lambda *a: pytest.fail("the Flax model was built"))
        run_predict(config, str(tmp_path / "work"))
        outs[use_stablehlo] = {f: np.asarray(nib.load(os.path.join(config.out_dir, f)).dataobj)
                               for f in sorted(os.listdir(config.out_dir))}
    assert list(outs[True]) == ["Brats18_SYN_0000_1.nii.gz", "Brats18_SYN_0000_1_probabilities.nii.gz"]
    np.testing.assert_allclose(outs[True]["Brats18_SYN_0000_1_probabilities.nii.gz"],
                               outs[False]["Brats18_SYN_0000_1_probabilities.nii.gz"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outs[True]["Brats18_SYN_0000_1.nii.gz"], outs[False]["Brats18_SYN_0000_1.nii.gz"])


def test_another_bundle_format_or_a_workdir_is_a_clear_error(bundle, workdir, tmp_path):
    old = tmp_path / "old_bundle"
    old.mkdir()
    (old / "bundle.json").write_text(json.dumps({"format": 1}))
    for load in (load_bundle, load_stablehlo_predictor):
        with pytest.raises(CMFLError, match=r"bundle.json: bundle format 1 is not supported \(this version reads "
                                            r"format 2\); export the bundle again"):
            load(str(old))
    config = load_config("predict")
    config.model_dir, config.use_stablehlo = str(workdir), True
    config.case = ",".join([os.path.join(bundle, "bundle.json")] * 4)  # any existing files: fails before reading
    with pytest.raises(CMFLError, match=r"config\.use_stablehlo needs a bundle"):
        run_predict(config, str(tmp_path / "work"))


def test_platforms_are_checked():
    assert parse_platforms("cpu, CUDA,tpu,cpu") == ("cpu", "cuda", "tpu")
    with pytest.raises(CMFLError, match=r"config.platforms: cpu,gpu: give a comma-separated list of cpu, cuda, rocm"):
        parse_platforms("cpu,gpu")


def test_a_bundle_for_other_platforms_only_is_refused_here(workdir, tmp_path):
    bundle = export_bundle(str(workdir), str(tmp_path / "tpu_only"), "best", platforms="tpu")
    with pytest.raises(CMFLError, match=r"\.stablehlo: exported for tpu, not for this machine's cpu"):
        load_stablehlo_predictor(bundle)
