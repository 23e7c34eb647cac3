"""The package's import rules (README, "Layout"), read from the source: every import statement, at module
level or inside a function, as an edge between modules of ``cmfl_jax``."""

from __future__ import annotations

import ast
import glob
import os

import pytest

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "cmfl_jax")
STDLIB_FILE_IO = {"os", "io", "pathlib", "shutil", "tempfile", "glob", "json", "csv", "gzip", "pickle"}
FILE_IO_LIBRARIES = {"nibabel", "orbax", "tensorboardX", "matplotlib", "grain", *STDLIB_FILE_IO}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def package_modules() -> dict[str, str]:
    """``{dotted module name: file}`` of every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                out[module_name(os.path.join(folder, name))] = os.path.join(folder, name)
    return out


def imports_of(path: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of the package that ``path`` imports, top-level names of the outside packages it imports)."""
    inside, outside = set(), set()
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from pkg import sub`` imports the module ``pkg.sub`` when there is one, else names from ``pkg``
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            (inside if name.split(".")[0] == "cmfl_jax" else outside).add(name if name in known else name.split(".")[0])
    inside.discard("cmfl_jax")  # the package's own __init__ holds only the version
    return inside, outside


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = package_modules()
    graph, outside = {}, {}
    for name, path in modules.items():
        graph[name], outside[name] = imports_of(path, set(modules))
    return graph, outside


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def is_job(module: str) -> bool:
    return module.startswith("cmfl_jax.jobs.")


GRAPH, OUTSIDE = import_graph()


def test_the_graph_is_read_from_the_code():
    """The reader sees real edges (so the rules below are not vacuously true)."""
    assert "cmfl_jax.training.cmff_step" in GRAPH["cmfl_jax.jobs.cmff"]
    assert "cmfl_jax.models.builder" in GRAPH["cmfl_jax.inference.predictor"]
    assert "cmfl_jax.jobs" in GRAPH["cmfl_jax.main"]
    assert {"numpy", "scipy"} <= OUTSIDE["cmfl_jax.metrics"]
    assert len([m for m in GRAPH if is_job(m)]) == 9


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None


def test_no_job_imports_another_job():
    edges = [(m, d) for m, deps in GRAPH.items() if is_job(m) for d in deps if is_job(d)]
    assert edges == []


def test_only_main_the_demo_and_the_stage_runner_use_the_job_registry_and_nothing_imports_main():
    """The demo and the CV job run other jobs as stages only through the stage runner (or the registry)."""
    users = sorted(m for m, deps in GRAPH.items() if "cmfl_jax.jobs" in deps or any(is_job(d) for d in deps))
    assert users == ["cmfl_jax.jobs.demo", "cmfl_jax.main", "cmfl_jax.stage_runner"]
    assert [m for m, deps in GRAPH.items() if "cmfl_jax.main" in deps] == []


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("cmfl_jax.models")))
def test_models_import_neither_data_nor_jobs_nor_file_io(module):
    inside = {d for d in GRAPH[module] if not d.startswith("cmfl_jax.models")}
    assert inside <= {"cmfl_jax.errors"}, inside
    # The oneDNN loader finds the compiled extension beside the package and reads its switches from the
    # environment (os, ctypes): it loads code, never a data file.
    allowed = {"os"} if module == "cmfl_jax.models.onednn" else set()
    assert not OUTSIDE[module] & FILE_IO_LIBRARIES - allowed, OUTSIDE[module] & FILE_IO_LIBRARIES


def test_metrics_are_numpy_and_scipy_only():
    """metrics.py reads its regions from the label-set table, itself numpy only (and the error type)."""
    assert GRAPH["cmfl_jax.label_sets"] <= {"cmfl_jax.errors"}
    standard = {"__future__", "collections", "dataclasses", "functools", "typing"}
    assert OUTSIDE["cmfl_jax.label_sets"] - standard <= {"numpy"}
    assert GRAPH["cmfl_jax.metrics"] <= {"cmfl_jax.label_sets"}
    assert OUTSIDE["cmfl_jax.metrics"] - {"__future__", "collections", "typing"} == {"numpy", "scipy"}
    assert GRAPH["cmfl_jax.lesion_metrics"] == {"cmfl_jax.metrics"}
    assert OUTSIDE["cmfl_jax.lesion_metrics"] - {"__future__", "collections", "sys"} == {"numpy", "scipy"}


def test_no_module_over_250_lines():
    """The package's modules and the experiments' (README, "Layout")."""
    experiments = glob.glob(os.path.join(REPO, "experiments", "*.py"))
    assert len(experiments) > 5
    files = [*package_modules().values(), *experiments]
    long = {os.path.relpath(p, REPO): n for p in files if (n := sum(1 for _ in open(p))) > 250}
    assert long == {}


def test_data_imports_only_data_errors_progress_label_sets_and_the_synthetic_set_where_it_makes_it():
    """The data layer reaches the synthetic package in two places only: dataset.py, which generates the built-in
    data set when no root is given, and phantom.py, the documented name of the simulator (a re-export)."""
    synthetic = {m for m in GRAPH if m.startswith("cmfl_jax.synthetic")}
    for module in (m for m in GRAPH if m.startswith("cmfl_jax.data")):
        outside_data = {d for d in GRAPH[module] if not d.startswith("cmfl_jax.data")}
        allowed = {"cmfl_jax.errors", "cmfl_jax.progress", "cmfl_jax.label_sets"}
        if module in ("cmfl_jax.data.dataset", "cmfl_jax.data.phantom"):
            allowed |= synthetic
        if module == "cmfl_jax.data.device_augment":  # it runs on the device batch, sharded over the data axis
            allowed |= {"cmfl_jax.sharding"}
        assert outside_data <= allowed, (module, outside_data)


def test_synthetic_uses_only_the_data_layers_file_names_and_writer():
    """Dataset creation sits beside data loading: it names and writes files through data.layouts and data.io, and
    knows nothing of the cache, the pipeline or anything above the data layer."""
    assert "cmfl_jax.synthetic.subject" in GRAPH["cmfl_jax.synthetic.writer"]
    allowed = {"cmfl_jax.data.layouts", "cmfl_jax.data.io", "cmfl_jax.errors", "cmfl_jax.progress"}
    for module in (m for m in GRAPH if m.startswith("cmfl_jax.synthetic")):
        outside = {d for d in GRAPH[module] if not d.startswith("cmfl_jax.synthetic")}
        assert outside <= allowed, (module, outside)


def test_inference_imports_no_training_so_the_layers_only_point_down():
    """training -> inference -> checkpoints, models, data: never back up from inference to training or jobs."""
    for module in (m for m in GRAPH if m.startswith("cmfl_jax.inference")):
        assert not {d for d in GRAPH[module] if d.startswith(("cmfl_jax.training", "cmfl_jax.jobs"))}, module
