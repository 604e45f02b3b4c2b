"""The demo's pipeline end to end at a tiny size: sample -> export -> balance -> train -> upload page."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from fastapi.testclient import TestClient
from PIL import Image

from load_data import CLASS_NAMES
from main import create_app


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_demo_pipeline_trains_a_model_the_page_serves(tmp_path: Path) -> None:
    done = subprocess.run(
        ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path), "pipeline",
         f"PY={sys.executable}", "SAMPLE_N=60", "CPU_PROFILE=--image-size 32 --epochs 2 --workers 1"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no GPU: training the CPU profile" in done.stdout
    assert (tmp_path / "galaxy10_sample.h5").is_file()
    assert (tmp_path / "data" / "manifest.csv").is_file()
    assert (tmp_path / "balanced_data" / "manifest.csv").is_file()
    report = json.loads((tmp_path / "based_on_balanced_data_model.report.json").read_text())
    assert 0.0 <= report["accuracy"] <= 1.0

    galaxy = np.asarray(Image.open(next((tmp_path / "data" / "val").rglob("*.png"))))
    upload = io.BytesIO()
    Image.fromarray(galaxy).save(upload, format="PNG")
    with TestClient(create_app(tmp_path)) as client:
        page = client.get("/")
        assert page.status_code == 200 and "based_on_balanced_data_model" in page.text
        answer = client.post("/api/predict", files={"file": ("galaxy.png", upload.getvalue(), "image/png")})
    assert answer.status_code == 200
    assert answer.json()["class_name"] in CLASS_NAMES
    assert answer.json()["model"] == "based_on_balanced_data_model"
