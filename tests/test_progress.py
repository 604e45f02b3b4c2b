"""progress.py: a live bar in a terminal, plain periodic lines where the output goes to a file (a log, a
SLURM job), and a catalog's total and time left known before its first image."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image
from tqdm import tqdm

import cnn_use_model as cum
from galaxy10 import progress
from galaxy10.errors import run_cli

from helpers import galaxy_array

pytestmark = pytest.mark.usefixtures("cpu_inference")


def test_output_to_a_file_gets_plain_lines_at_the_interval_and_at_the_end(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = iter(float(t) for t in range(0, 1000, 10))  # every call: 10 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress, "LINE_SECONDS", 25.0)
    bar = progress.progress_bar(total=6, desc="decoding", unit="img")
    assert isinstance(bar, progress.PlainProgress)  # pytest's captured streams are no terminal
    with bar:
        for _ in range(6):
            bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    assert re.fullmatch(r"decoding: [1-5]/6 img \(\d+%\), 0\.\d\d img/s, \d+s left", lines[0]), lines
    assert re.fullmatch(r"decoding: 6/6 img \(100%\), 0\.\d\d img/s, done in 1m\d\ds", lines[-1]), lines
    assert 2 <= len(lines) < 6  # not a line per image: one per 25 s or more, then the last


def test_an_epochs_bar_says_nothing_at_its_end_in_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    for _ in progress.progress_bar(range(3), desc="epoch 1/2", unit="batch", leave=False):
        pass
    assert capsys.readouterr().err == ""  # the epoch's own line follows it


def test_a_terminal_gets_the_live_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "interactive", lambda: True)
    bar = progress.progress_bar(total=2, desc="x", disable=True)
    assert isinstance(bar, tqdm)
    bar.close()


def test_a_csv_catalog_has_its_total_and_time_left_from_the_start(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)  # a line per image
    for i in range(3):
        Image.fromarray(galaxy_array(i)).save(tmp_path / f"g{i}.png")
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("path\n" + "".join(f"g{i % 3}.png\n" for i in range(5)))
    out = tmp_path / "out.csv"
    assert run_cli(cum.cli_main, [str(catalog), "--model", str(ckpt), "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("classifying:")]
    assert re.fullmatch(r"classifying: 1/5 img \(20%\), .* left", lines[0]), lines
    assert lines[-1].startswith("classifying: 5/5 img (100%)")
