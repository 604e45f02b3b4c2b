"""docs/results.md and the README's headline table are generated from benchmarks/results/ and up to date."""
from __future__ import annotations

import datetime
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_module(name: str):
    """benchmarks/<name>.py, imported by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results():
    return load_module("results")


def test_docs_results_is_up_to_date_with_the_result_files(results, capsys):
    assert results.main(["--check"]) == 0, capsys.readouterr().err


def test_every_row_has_its_command_date_and_machine():
    files = sorted(RESULTS.glob("*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        assert data["title"] and data["rows"], path.name
        for row in data["rows"]:
            where = f"{path.name}: {row.get('name')}"
            assert row["name"] and row["metrics"], where
            assert row["command"].startswith("python "), where
            datetime.date.fromisoformat(row["date"])
            assert row["machine"].strip(), where
            known = {c["key"].split(".")[0] for c in data["columns"]}
            assert known & set(row["metrics"]), f"{where}: no metric the table shows"


def test_check_fails_when_a_figure_changes_and_a_rerun_replaces_only_its_rows(results, tmp_path, monkeypatch):
    record = load_module("record")
    folder = tmp_path / "results"
    folder.mkdir()
    for path in RESULTS.glob("*.json"):
        (folder / path.name).write_text(path.read_text())
    page, readme = tmp_path / "results.md", tmp_path / "README.md"
    page.write_text((ROOT / "docs" / "results.md").read_text())
    readme.write_text((ROOT / "README.md").read_text())
    args = ["--results", str(folder), "--out", str(page), "--readme", str(readme)]
    assert results.main([*args, "--check"]) == 0

    monkeypatch.setattr(sys, "argv", ["bench_inference.py"])
    before = json.loads((folder / "bench_inference.json").read_text())
    row = record.row("predict()", "python benchmarks/bench_inference.py", {"median_ms": 12.3})
    record.write("bench_inference", [row], title=before["title"], columns=before["columns"], folder=folder)
    data = json.loads((folder / "bench_inference.json").read_text())
    assert [r["name"] for r in data["rows"]] == [r["name"] for r in before["rows"]]  # replaced in place
    assert data["rows"][0]["metrics"] == {"median_ms": 12.3}
    assert data["rows"][0]["headline"] and "source" not in data["rows"][0]
    assert data["rows"][1:] == before["rows"][1:]  # the other rows as they were

    assert results.main([*args, "--check"]) == 1
    assert results.main(args) == 0
    assert results.main([*args, "--check"]) == 0
    assert "12.3" in page.read_text() and "**12.3 ms**" in readme.read_text()


def test_a_row_can_give_the_headline_several_figures(results) -> None:
    specs = [{"label": "its accuracy", "metric": "accuracy"}, {"label": "its ECE", "metric": "ece"}]
    row = {"name": "r", "command": "python b.py", "date": "2026-12-07", "machine": "m",
           "metrics": {"accuracy": 0.5, "ece": 0.04}, "headline": specs}
    data = {"columns": [{"key": "accuracy", "format": ".1%"}, {"key": "ece", "format": ".3f"}], "rows": [row]}
    lines = results.headline([data]).splitlines()
    assert "| its accuracy | **50.0%** |" in lines[2] and "| its ECE | **0.040** |" in lines[3]
