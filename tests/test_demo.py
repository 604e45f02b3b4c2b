"""The demo's pipeline end to end at a tiny size: sample -> export -> balance -> train -> upload page;
and the Makefile's targets run from another folder."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from galaxy10.dataset import CLASS_NAMES
from main import create_app

from helpers import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("cpu_inference")]  # the references are CPU float32

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The project's Makefile run in ``folder``, as `make -f path/to/Makefile -C folder ...`, with
    ``env`` added to the environment. Flags and variables of a make that runs these tests (`make test
    PY=...`) are left out: they would override the ones the test sets."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    command = ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-C", str(folder), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**inherited, **env})


def served_answers(client: TestClient, val: Path) -> list[tuple[int, dict]]:
    """(true label, the API's answer) for every image under ``val/<label>/``, uploaded as it is."""
    answers = []
    for path in sorted(val.rglob("*.png")):
        answer = client.post("/api/predict", files={"file": (path.name, path.read_bytes(), "image/png")})
        assert answer.status_code == 200, answer.text
        answers.append((int(path.parent.name), answer.json()))
    return answers


def near_tie(answer: dict) -> bool:
    """Top two probabilities within 1e-4: only such an answer may come out differently in another
    process (batched or not) without anything being wrong."""
    second, first = sorted(answer["probabilities"].values())[-2:]
    return first - second < 1e-4


@needs_make
def test_demo_pipeline_trains_a_model_the_page_serves(tmp_path: Path) -> None:
    # No GPU for this run even on a machine with one: with CUDA the Makefile trains the full 256 px
    # configuration instead of the tiny CPU profile given here.
    done = make(tmp_path, "pipeline", f"PY={sys.executable}", "SAMPLE_N=60",
                "CPU_PROFILE=--image-size 32 --epochs 2 --workers 1", CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no GPU: training the CPU profile" in done.stdout
    # Output to a file (here, pipes), as `make pipeline > log` or a SLURM job: plain lines, no bar frames.
    log = done.stdout + done.stderr
    assert "\r" not in log
    assert re.search(r"^rendering galaxy10_sample\.h5: 60/60 img \(100%\), .* done in \d+s$", log, re.M), log
    assert re.search(r"^evaluating: \d+/\d+ img \(100%\)", log, re.M)
    assert (tmp_path / "galaxy10_sample.h5").is_file()
    assert (tmp_path / "data" / "manifest.csv").is_file()
    assert (tmp_path / "balanced_data" / "manifest.csv").is_file()

    report = json.loads((tmp_path / "based_on_balanced_data_model.report.json").read_text())
    val = tmp_path / "balanced_data" / "val"
    matrix = np.array(report["confusion_matrix"])
    assert report["n_samples"] == len(list(val.rglob("*.png"))) == matrix.sum()
    assert matrix.sum(axis=1).tolist() == [len(list((val / str(c)).glob("*.png"))) for c in range(10)]
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())

    with TestClient(create_app(tmp_path)) as client:
        page = client.get("/")
        assert page.status_code == 200 and "based_on_balanced_data_model" in page.text
        answers = served_answers(client, val)
    assert {answer["model"] for _, answer in answers} == {"based_on_balanced_data_model"}
    assert all(answer["class_name"] == CLASS_NAMES[answer["class_id"]] for _, answer in answers)
    served = np.zeros_like(matrix)
    for label, answer in answers:
        served[label, answer["class_id"]] += 1
    # The page serves the model the report evaluated: the same answers, but for near ties, each of
    # which could move one image between two cells of its row.
    assert np.abs(served - matrix).sum() <= 2 * sum(near_tie(answer) for _, answer in answers), (
        served.tolist(), matrix.tolist())


def fake_python(venv: Path) -> Path:
    """``venv/bin/python``: a stand-in that appends its folder and arguments to ``venv/calls.log`` and
    does nothing else, so that make runs every recipe for real (the nested makes too) without building
    an environment, training or serving; it answers the CUDA check (``-c``) with "no GPU"."""
    python = venv / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$(pwd -P) $*" >> {venv / "calls.log"}\n[ "$1" != -c ]\n')
    python.chmod(0o755)
    return python


@needs_make
def test_demo_runs_from_another_folder(tmp_path: Path) -> None:
    venv, work = tmp_path / "venv", tmp_path / "work"
    python = fake_python(venv)
    work.mkdir()
    work = work.resolve()  # as `pwd -P` prints it
    log = venv / "calls.log"
    demo = [f"{work} {ROOT}/main.py --host 127.0.0.1 --port 8000 --check-port",
            f"{work} {ROOT}/sample_data.py --out galaxy10_sample.h5 --n 2000",
            f"{work} {ROOT}/load_data.py --h5 galaxy10_sample.h5 --out data --force",
            f"{work} {ROOT}/preprocess_and_balancing.py --h5 galaxy10_sample.h5 --out balanced_data --force",
            f"{work} -c import sys, torch; sys.exit(not torch.cuda.is_available())",
            f"{work} {ROOT}/cnn.py --preset cpu",
            f"{work} {ROOT}/main.py --host 127.0.0.1 --port 8000"]

    first = make(work, "demo", f"VENV={venv}", f"PYTHON={python}")
    assert first.returncode == 0, first.stdout + first.stderr
    assert log.read_text().splitlines() == [  # a fresh clone: the environment is set up first
        f"{work} -m venv {venv}",
        f"{work} -m pip install -q --upgrade pip",
        f"{work} -m pip install -q -r {ROOT}/requirements.txt",
        f"{work} -m pip install -q --no-deps -e {ROOT}/",  # the galaxy10 package, editable
        *demo,
    ]
    assert "no GPU: training the CPU profile (--preset cpu)" in first.stdout
    log.unlink()
    again = make(work, "demo", f"VENV={venv}", f"PYTHON={python}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert log.read_text().splitlines() == demo  # the environment is up to date with requirements.txt
    assert list(work.iterdir()) == []  # nothing else ran there


@needs_make
def test_make_full_downloads_then_exports_once(tmp_path: Path) -> None:
    venv, work = tmp_path / "venv", tmp_path / "work"
    python = fake_python(venv)
    work.mkdir()
    work = work.resolve()
    done = make(work, "full", f"VENV={venv}", f"PYTHON={python}")
    assert done.returncode == 0, done.stdout + done.stderr
    calls = (venv / "calls.log").read_text().splitlines()[4:]  # after the environment's set-up
    assert calls == [
        f"{work} {ROOT}/load_data.py --download --h5 Galaxy10_DECals.h5 --out data --force",
        f"{work} {ROOT}/preprocess_and_balancing.py --h5 Galaxy10_DECals.h5 --out balanced_data --force",
        f"{work} -c import sys, torch; sys.exit(not torch.cuda.is_available())",
        f"{work} {ROOT}/cnn.py --preset cpu",
    ]
