"""What the README promises of every script: `--help` prints its usage and exits 0, and importing it does
nothing (prints nothing, writes no file) until its main() runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, one_thread_env

SCRIPTS = [ROOT / name for name in ("cnn.py", "cnn_use_model.py", "main.py", "load_data.py",
                                    "preprocess_and_balancing.py", "sample_data.py")]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("bench_*.py"))


def test_the_scripts_and_benchmarks_are_all_here() -> None:
    """The lists below cover what the README names, so that a renamed script is not silently skipped."""
    assert all(script.is_file() for script in SCRIPTS)
    assert {p.stem for p in BENCHMARKS} >= {"bench_catalog", "bench_export", "bench_inference", "bench_real",
                                            "bench_sample_data", "bench_server", "bench_train"}


HELP_EACH = """
import contextlib, io, runpy, sys
for path in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [path, "--help"]
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(path, run_name="__main__")
            code = "no exit"
        except SystemExit as done:
            code = done.code
    print(f"--- {path} exit {code}")
    print(out.getvalue())
"""


@pytest.mark.slow
def test_every_script_prints_its_usage_for_help_and_exits_0(tmp_path: Path) -> None:
    """Each run as `python SCRIPT --help` runs it (runpy, as __main__), in one interpreter so that torch is
    imported once; from an empty folder, which stays empty."""
    scripts = [*SCRIPTS, *BENCHMARKS]
    env = one_thread_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]))
    done = subprocess.run([sys.executable, "-c", HELP_EACH, *map(str, scripts)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = done.stdout.split("--- ")[1:]
    assert len(reports) == len(scripts)
    for script, report in zip(scripts, reports, strict=True):
        header, _, usage = report.partition("\n")
        assert header == f"{script} exit 0", f"{script}: {header}\n{usage[-500:]}{done.stderr[-2000:]}"
        assert usage.startswith("usage: ") and "--help" in usage, f"{script}:\n{usage[-500:]}"
    assert list(tmp_path.iterdir()) == []


IMPORT_EACH = """
import importlib, sys
for name in sys.argv[1:]:
    print(f"--- {name}", flush=True)
    print(f"--- {name}", file=sys.stderr, flush=True)
    importlib.import_module(name)
"""


@pytest.mark.slow
def test_importing_any_script_prints_nothing_and_writes_no_file(tmp_path: Path) -> None:
    """One interpreter imports them in turn, marking where each begins: whatever a module prints lands
    under its own name (or under the script that imported it first)."""
    names = [p.stem for p in [*SCRIPTS, *BENCHMARKS]]
    env = one_thread_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]))
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH, *names], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    marks = "".join(f"--- {name}\n" for name in names)
    assert done.stdout == marks, done.stdout[-3000:]
    assert done.stderr == marks, done.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []
