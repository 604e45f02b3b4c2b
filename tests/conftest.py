"""Fixtures shared by the test files (each file is named after the script it tests)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared sits beside a developer's checkout and CI's clone; a user's clone has none.
REAL_GALAXY10 = ROOT.parent / "shared" / "real_galaxy10"


@pytest.fixture(scope="session")
def real_galaxies() -> list[tuple[Path, int]]:
    """The 60 real Galaxy10 DECaLS images as (path, label); skips where ../shared is absent."""
    labels = REAL_GALAXY10 / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"{REAL_GALAXY10} is absent (only developers and CI have it)")
    with labels.open(newline="") as f:
        return [(REAL_GALAXY10 / "images" / row["file"], int(row["label"])) for row in csv.DictReader(f)]
