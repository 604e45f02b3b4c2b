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


@pytest.mark.slow  # most scripts import torch: about 3 s each on 2 cores
def test_every_script_prints_its_usage_for_help_and_exits_0(tmp_path: Path) -> None:
    """All at once (the CPUs are shared, the start-up is mostly import time); each from an empty folder,
    which stays empty."""
    runs = {script: subprocess.Popen([sys.executable, str(script), "--help"], cwd=tmp_path, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=one_thread_env())
            for script in [*SCRIPTS, *BENCHMARKS]}
    failures = []
    for script, process in runs.items():
        out, err = process.communicate(timeout=300)
        if process.returncode != 0 or not out.startswith("usage: ") or "--help" not in out:
            name = script.relative_to(ROOT)
            failures.append(f"{name}: exit {process.returncode}\n{out[-500:]}{err[-3000:]}")
    assert failures == [], "\n\n".join(failures)
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
