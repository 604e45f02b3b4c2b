"""The Galaxy10 DECaLS dataset: its facts (class names, counts, checksum, where to get it, the per-row
metadata) and its HDF5 file, checked and read in chunks (`open_galaxy10`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from galaxy10.errors import Galaxy10Error

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
DEFAULT_H5 = "Galaxy10_DECals.h5"  # the official file's name, which every script looks for by default
DOWNLOAD_SIZE = "2.54 GB"  # the official file's size, as its publisher gives it
# Per-row float64 metadata stored beside `images` and `ans`.
META_FIELDS: tuple[str, ...] = ("ra", "dec", "redshift", "pxscale")
# What an export folder says of its source (the HDF5 file, and whether it is sample_data.py's synthetic
# sample), beside its manifest; training records it in the checkpoint.
DATASET_INFO = "dataset.json"
SAMPLE_GENERATOR = "sample_data.py"  # the `generator` attribute of the synthetic sample's HDF5 file
# Rows read per HDF5 access: 64 full-size images are 12.6 MB, so a worker's memory stays small.
CHUNK_ROWS = 64


# ---------------------------------------------------------------- the HDF5 file


@dataclass(frozen=True)
class Galaxy10File:
    """A checked Galaxy10-format file: labels and metadata in memory, images left on disk and read in
    chunks (the full file is DOWNLOAD_SIZE). Export needs all of it; inference needs only `images`."""

    path: Path
    labels: np.ndarray | None  # (N,) class ids; None where the file has no `ans`
    meta: dict[str, np.ndarray]  # ra, dec, redshift, pxscale: (N,) float64, where the file has them
    image_shape: tuple[int, int, int]
    rows: int
    synthetic: bool = False  # sample_data.py's synthetic sample (its `generator` attribute)

    def __len__(self) -> int:
        return self.rows

    @cached_property
    def has_galaxy10_classes(self) -> bool:
        """The labels are Galaxy10's ten classes, all of them (as exported class folders 0 to 9 are named)."""
        return self.labels is not None and set(np.unique(self.labels)) == set(range(len(CLASS_NAMES)))

    def class_name(self, label: int) -> str:
        """A label's class name: Galaxy10's in a file of its ten classes, else the label itself, for a file of
        the user's own classes."""
        return CLASS_NAMES[label] if self.has_galaxy10_classes else str(label)

    def iter_images(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        """Every row of `images`, in order, read `chunk_rows` at a time."""
        with h5py.File(self.path, "r") as f:
            images = f["images"]
            for start in range(0, self.rows, chunk_rows):
                yield from read_rows(images, slice(start, start + chunk_rows))


def open_galaxy10(path: str | os.PathLike[str], *, complete: bool = True) -> Galaxy10File:
    """Check that ``path`` is a Galaxy10-format file and read everything but the images: with `complete`
    (export), the labels and metadata it must hold and image data that runs to the end of the file; without
    (inference), an (N, H, W, 3) uint8 `images` dataset and its labels where it has them."""
    path = Path(path)
    if not path.is_file():
        raise Galaxy10Error(
            f"{path} not found: download it from {DOWNLOAD_URL} "
            "or make a sample with `python sample_data.py --out galaxy10_sample.h5`"
        )
    if not h5py.is_hdf5(path):
        raise Galaxy10Error(f"{path} is not an HDF5 file: pass a Galaxy10_DECals.h5 file")
    try:
        with h5py.File(path, "r") as f:
            return _read_checked(f, path, complete)
    except OSError as err:
        raise Galaxy10Error(f"{path} is damaged or truncated ({err}): download it again") from None


def _read_checked(f: h5py.File, path: Path, complete: bool) -> Galaxy10File:
    required = ("images", "ans", *META_FIELDS) if complete else ("images",)
    missing = [name for name in required if name not in f]
    if missing:
        raise Galaxy10Error(
            f"{path} lacks the dataset(s) {', '.join(missing)}: it is not a Galaxy10 DECaLS file"
        )
    images = f["images"]
    if not isinstance(images, h5py.Dataset) or images.ndim != 4 or images.shape[3] != 3 or (
            complete and min(images.shape[1:3]) < 32):
        raise Galaxy10Error(f"{path}: `images` has shape {getattr(images, 'shape', None)}, expected "
                            "(N, H, W, 3) RGB images: it is not a Galaxy10 DECaLS file")
    if images.dtype != np.uint8:
        raise Galaxy10Error(f"{path}: `images` is {images.dtype}, expected uint8: it is not a Galaxy10 "
                            "DECaLS file")
    n = images.shape[0]
    if complete:
        _check_storage_complete(images, path)
    labels = _read_labels(f, n, path, complete) if "ans" in f else None
    meta = {name: _read_vector(f, name, n, path).astype(np.float64) for name in META_FIELDS if name in f}
    synthetic = f.attrs.get("generator") == SAMPLE_GENERATOR
    return Galaxy10File(path, labels, meta, tuple(images.shape[1:]), n, bool(synthetic))


def _read_labels(f: h5py.File, n: int, path: Path, complete: bool) -> np.ndarray:
    labels = _read_vector(f, "ans", n, path)
    if labels.dtype.kind not in "iu":
        raise Galaxy10Error(f"{path}: `ans` is {labels.dtype}, expected integer class ids")
    bad = np.flatnonzero(labels < 0)
    if complete and bad.size:
        raise Galaxy10Error(
            f"{path}: label {labels[bad[0]]} at row {bad[0]} is negative ({bad.size} bad row(s)): class ids "
            "count from 0; fix the `ans` dataset"
        )
    return labels.astype(np.int64)


def _read_vector(f: h5py.File, name: str, n: int, path: Path) -> np.ndarray:
    data = f[name]
    if data.shape != (n,):
        raise Galaxy10Error(f"{path}: `{name}` has shape {data.shape}, expected ({n},) like `images`")
    if data.dtype.kind not in "iuf":
        raise Galaxy10Error(f"{path}: `{name}` is {data.dtype}, expected numbers")
    return data[()]


def _check_storage_complete(images: h5py.Dataset, path: Path) -> None:
    """Fail now, not after minutes of export, if the image data runs past the end of the file."""
    file_size = path.stat().st_size
    dsid = images.id
    if images.chunks is None:
        end = dsid.get_offset() or 0
        end += dsid.get_storage_size()
    else:
        chunks = (dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks()))
        end = max((c.byte_offset + c.size for c in chunks), default=0)
    if end > file_size:
        raise Galaxy10Error(
            f"{path} is truncated ({file_size:,} bytes, image data runs to {end:,}): download it again"
        )


def read_rows(images: h5py.Dataset, rows: np.ndarray | slice) -> np.ndarray:
    """Rows of an open file's `images`; a damaged chunk becomes a one-line error."""
    try:
        return images[rows]
    except OSError as err:
        start = rows.start if isinstance(rows, slice) else rows[0]
        raise Galaxy10Error(f"{images.file.filename} is damaged at row {start} ({err}): download or "
                            "export it again") from None


