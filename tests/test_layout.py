"""The layout the README promises, read from the source (no module is imported): six thin scripts at the root
over one package, imports that run one way, inference and the web page apart from training, and tests and
benchmarks that import the package as it is installed."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT

SCRIPTS = ("sample_data", "load_data", "preprocess_and_balancing", "cnn", "cnn_use_model", "main")
PACKAGE = ROOT / "galaxy10"
MAX_SCRIPT_LINES, MAX_MODULE_LINES = 250, 500
TRAINING = {f"galaxy10.{name}" for name in ("config", "data", "augment", "training", "run", "fitting",
                                              "evaluation")}
# What inference and the web page are made of: none of it may reach the training modules.
SERVING = tuple(f"galaxy10.{name}" for name in ("inference", "prediction", "classify", "web", "uploads",
                                                "registry", "catalog", "inputs"))


def module_files() -> dict[str, Path]:
    """Every project module by its import name: the scripts and the package's modules."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    modules |= {f"galaxy10.{path.stem}": path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    return modules


def imported_by(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it (a function's late import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & known


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_by(path, set(files)) for name, path in files.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for name in graph[todo.pop()] - seen:
            seen.add(name)
            todo.append(name)
    return seen


def test_the_root_holds_the_six_scripts_and_they_stay_thin() -> None:
    assert sorted(path.stem for path in ROOT.glob("*.py")) == sorted(SCRIPTS)
    for name in SCRIPTS:
        lines = len((ROOT / f"{name}.py").read_text().splitlines())
        assert lines <= MAX_SCRIPT_LINES, f"{name}.py has {lines} lines"


def test_no_package_module_is_over_500_lines() -> None:
    lines = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert {name: n for name, n in lines.items() if n > MAX_MODULE_LINES} == {}


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_imports_another_and_the_package_imports_none(script: str) -> None:
    graph = import_graph()
    assert graph[script] & set(SCRIPTS) == set()
    importers = [name for name, imports in graph.items()
                 if name.startswith("galaxy10.") and script in imports]
    assert importers == []


def test_imports_run_one_way_without_a_loop() -> None:
    graph = import_graph()
    loops = [name for name in graph if name in reachable(graph, name)]
    assert loops == []


@pytest.mark.parametrize("module", SERVING)
def test_inference_and_the_web_page_never_reach_training(module: str) -> None:
    assert reachable(import_graph(), module) & TRAINING == set()


def test_tests_and_benchmarks_import_the_package_without_editing_sys_path() -> None:
    files = [*ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]
    editing = [path.name for path in files if "sys.path" in path.read_text()
               and path.name != "test_layout.py"]
    assert editing == []
