"""experiments/colab.ipynb runs headless: the smoke parameters injected, every cell executed by a real kernel.

The notebook's clone cell clones a git snapshot of this checkout (its files as they are now, uncommitted edits
included), its install cells check the pins with ``pip --no-index`` (nothing is downloaded), its accelerator
cell must report the CPU, and the method runs with the ``:smoke`` configs on the built-in synthetic data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from .conftest import REPO
from .test_demo import REGIONS, parse_summary_table

NOTEBOOK = os.path.join(REPO, "experiments", "colab.ipynb")
CELL_TIMEOUT = 300  # seconds per cell; the longest, CMFT, took 2 min on 2 busy cores with a cold compile cache
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]


def snapshot_repo(dest) -> str:
    """A git repository at ``dest`` holding this checkout's files (tracked and untracked, not ignored); its commit.

    Cloning the checkout itself would give its last commit, not the code under test.
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        files = [f for f in listed.stdout.split("\0") if f and os.path.isfile(os.path.join(REPO, f))]
    else:  # not a git checkout (an unpacked archive): every file outside hidden folders, caches and runs
        files = []
        for d, dirs, names in os.walk(REPO):
            dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("__pycache__", "runs")]
            files += [os.path.relpath(os.path.join(d, f), REPO) for f in names]
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), os.path.join(dest, rel))
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot for tests/test_notebook.py"]):
        subprocess.run([*GIT, *cmd], cwd=dest, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=dest, check=True, capture_output=True,
                          text=True).stdout.strip()


def kernel_manager(kernels_dir) -> KernelManager:
    """A ``python3`` kernel that runs this interpreter (not whatever kernelspec the machine has installed)."""
    spec_dir = os.path.join(kernels_dir, "python3")
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "Python 3 (test)", "language": "python"}, f)
    specs = KernelSpecManager(kernel_dirs=[str(kernels_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def inject_parameters(nb, values: dict) -> None:
    """Papermill's way: a cell tagged "injected-parameters" right after the one cell tagged "parameters"."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"cells tagged 'parameters': {tagged}"
    defined = nb.cells[tagged[0]].source
    for name in values:
        assert f"\n{name} = " in f"\n{defined}", f"{name} is not a parameter of the notebook"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, cell)


def text_of(cell) -> str:
    """What a code cell printed (streams) and showed as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out and "text/plain" in out.data:
            parts.append(out.data["text/plain"])
    return "".join(parts)


def tagged(nb, tag: str) -> list:
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert cells, f"no cell tagged {tag!r}"
    return cells


def requirement_pin(name: str) -> str:
    with open(os.path.join(REPO, "requirements.txt")) as f:
        return next(line.split("==")[1].strip() for line in f if line.startswith(f"{name}=="))


def headless(tmp_path, monkeypatch) -> None:
    """The environment of a headless run: the kernel and the jobs inherit it."""
    assert os.environ.get("CMFL_JAX_CACHE", "").startswith(str(tmp_path))  # conftest's private cache
    assert os.environ.get("JAX_COMPILATION_CACHE_DIR")  # conftest's shared compile cache
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the smoke run is a CPU run on any machine
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no profile written to the home folder
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))  # connection files


def execute(nb, tmp_path) -> None:
    """Run every cell in a fresh kernel in ``tmp_path``; a cell that raises raises CellExecutionError."""
    client = NotebookClient(nb, km=kernel_manager(tmp_path / "kernels"), timeout=CELL_TIMEOUT, startup_timeout=120,
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / "colab.executed.ipynb")  # what each cell printed, to read after a failure


def test_notebook_runs_headless_smoke_on_cpu(tmp_path, monkeypatch):
    headless(tmp_path, monkeypatch)
    source = tmp_path / "source"
    commit = snapshot_repo(source)
    work, repo_dir = tmp_path / "work", tmp_path / "repo"

    nb = nbformat.read(NOTEBOOK, as_version=4)
    inject_parameters(nb, {
        "SMOKE": True,
        "MOUNT_DRIVE": False,
        "REPO_URL": str(source),
        "REPO_DIR": str(repo_dir),
        "REPO_REF": commit,
        "INSTALL_REQUIREMENTS": True,
        "PIP_OFFLINE": True,
        "INSTALL_ACCELERATOR": False,
        "EXPECT_ACCELERATOR": False,
        "DATA_ROOT": "",
        "WORK": str(work),
        "CACHE": "",  # keep the test's $CMFL_JAX_CACHE
        "PRECISION": "auto",
    })
    execute(nb, tmp_path)

    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"], cell.source[:200]
            if "check" in cell.metadata.get("tags", []):
                assert "OK: " in text_of(cell), f"a check cell did not reach its end:\n{cell.source[:300]}"

    assert f"python: {sys.executable} " in text_of(tagged(nb, "setup")[0])  # the kernel ran this interpreter

    clone = text_of(tagged(nb, "clone")[0])
    assert f"$ git clone {source} {repo_dir}" in clone and f"commit {commit}" in clone
    assert (repo_dir / "cmfl_jax" / "main.py").is_file()

    install = "".join(text_of(c) for c in tagged(nb, "install"))
    assert "OK: requirements: the" in install and "--no-index" in install
    assert f"jax {requirement_pin('jax')}," in install and f"flax {requirement_pin('flax')}," in install
    assert "INSTALL_ACCELERATOR is False" in install and "JAX plugins: none" in install
    assert "OK: accelerator install" in install

    accelerator = text_of(tagged(nb, "accelerator")[0])
    assert "JAX platform: cpu " in accelerator and "OK: accelerator: CPU run allowed" in accelerator
    assert "OK: precision: float32 (cpu: " in text_of(tagged(nb, "precision")[0])
    cache = text_of(tagged(nb, "cache")[0])
    assert f"cache: {os.environ['CMFL_JAX_CACHE']} (local disk; from $CMFL_JAX_CACHE" in cache
    assert "cache size estimate: 4 subjects (48x48x48)" in cache and "unmeasured" in cache
    assert json.loads((work / "prepare" / "cache_size.json").read_text())["subjects"] == 4

    split = json.loads((work / "split" / "split.json").read_text())
    train, validation = split["train"], split["validation"]
    assert train and validation and not set(train) & set(validation)
    predictions = sorted(os.listdir(work / "predict" / "predictions"))
    assert predictions == sorted(f"{s}.nii.gz" for s in validation)

    summary = (work / "evaluate" / "evaluation_summary.md").read_text()
    table = parse_summary_table(summary)
    assert set(table) == {"mean", "std", "median", "25quantile", "75quantile"}
    for region in REGIONS:
        assert 0.0 <= table["mean"][f"Dice {region}"] <= 1.0
    assert any("text/markdown" in o.get("data", {}) for o in tagged(nb, "evaluate")[0].outputs)

    bundle = work / "export" / "bundle"
    assert (bundle / "bundle.json").is_file() and any(p.endswith(".stablehlo") for p in os.listdir(bundle))


def test_notebook_stops_when_an_accelerator_is_expected_but_jax_sees_the_cpu(tmp_path, monkeypatch):
    """Colab's silent failure (a broken CUDA plugin, and training goes on on the CPU) is a loud one here."""
    headless(tmp_path, monkeypatch)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    inject_parameters(nb, {
        "SMOKE": True, "MOUNT_DRIVE": False, "REPO_URL": "", "REPO_DIR": REPO,  # the code is there: no clone
        "INSTALL_REQUIREMENTS": False, "INSTALL_ACCELERATOR": False, "EXPECT_ACCELERATOR": True,
        "DATA_ROOT": "", "WORK": str(tmp_path / "work"), "CACHE": "",
    })
    last = next(i for i, c in enumerate(nb.cells) if "accelerator" in c.metadata.get("tags", []))
    nb.cells = nb.cells[: last + 1]
    with pytest.raises(CellExecutionError, match="JAX sees only the CPU, but EXPECT_ACCELERATOR is True"):
        execute(nb, tmp_path)
    assert "not cloned" in text_of(tagged(nb, "clone")[0])
    assert "INSTALL_REQUIREMENTS is False" in text_of(tagged(nb, "install")[0])
    assert "OK: requirements:" in text_of(tagged(nb, "install")[0])  # the check runs all the same
    assert "JAX platform: cpu " in text_of(nb.cells[-1])
    assert not (tmp_path / "work" / "prepare").exists()  # nothing after the failed cell ran


@pytest.mark.parametrize("accel, dtype", [
    ({"kind": "Tesla T4", "backend": "gpu", "compute_capability": "7.5"}, "float16"),
    ({"kind": "Tesla T4", "backend": "gpu"}, "float16"),
    ({"kind": "NVIDIA A100-SXM4-40GB", "backend": "gpu", "compute_capability": "8.0"}, "bfloat16"),
    ({"kind": "NVIDIA L4", "backend": "gpu"}, "bfloat16"),
    ({"kind": "NVIDIA H100 80GB HBM3", "backend": "gpu", "compute_capability": "9.0"}, "bfloat16"),
    ({"kind": "TPU v5 lite", "backend": "tpu"}, "bfloat16"),
    ({"kind": "Tesla P100-PCIE-16GB", "backend": "gpu", "compute_capability": "6.0"}, "float32"),
    ({"kind": "cpu", "backend": "cpu"}, "float32"),
])
def test_the_precision_follows_the_device(accel, dtype):
    """The notebook's choice without a kernel: float16 with loss scaling on a T4, bfloat16 where it is native."""
    nb = nbformat.read(os.path.join(REPO, "experiments", "colab.ipynb"), as_version=4)
    source = tagged(nb, "precision")[0].source
    namespace = {}
    exec(source.split("\n\n\nif PRECISION")[0], namespace)  # the function only, not its call
    assert namespace["choose_precision"](accel)[0] == dtype
