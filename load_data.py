"""Export Galaxy10 DECaLS from HDF5 to class folders with a seeded, stratified train/val split.

    python load_data.py --h5 Galaxy10_DECals.h5 --out data

writes ``data/{train,val}/{label}/img_{index:05d}.png`` (``index`` = row in the HDF5 file) and
``data/manifest.csv``. The file is read in chunks by several worker processes, so memory stays
flat however large it is; the output appears only once it is complete.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "Disturbed Galaxies",
    "Merging Galaxies",
    "Round Smooth Galaxies",
    "In-between Round Smooth Galaxies",
    "Cigar Shaped Smooth Galaxies",
    "Barred Spiral Galaxies",
    "Unbarred Tight Spiral Galaxies",
    "Unbarred Loose Spiral Galaxies",
    "Edge-on Galaxies without Bulge",
    "Edge-on Galaxies with Bulge",
)
# Images per class in the official file (17,736 in all).
REAL_CLASS_COUNTS: tuple[int, ...] = (1081, 1853, 2645, 2027, 334, 2043, 1829, 2628, 1423, 1873)
OFFICIAL_SHA256 = "19aefc477c41bb7f77ff07599a6b82a038dc042f889a111b0d4d98bb755c1571"
DOWNLOAD_URL = "https://zenodo.org/records/10845026/files/Galaxy10_DECals.h5"
DEFAULT_H5 = "Galaxy10_DECals.h5"
# Per-row float64 metadata stored beside `images` and `ans`.
META_FIELDS: tuple[str, ...] = ("ra", "dec", "redshift", "pxscale")
MANIFEST_FIELDS: tuple[str, ...] = (
    "index", "label", "class_name", "split", "path", "ra", "dec", "redshift",
)
# Rows read per HDF5 access: 64 full-size images are 12.6 MB, so a worker's memory stays small.
CHUNK_ROWS = 64


class Galaxy10Error(Exception):
    """A problem the user can fix. Scripts print it as one line, without a traceback."""


def run_cli(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``; turn user errors and Ctrl-C into one line and an exit code."""
    try:
        main(argv)
    except Galaxy10Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was kept from the unfinished step", file=sys.stderr)
        return 130
    return 0
