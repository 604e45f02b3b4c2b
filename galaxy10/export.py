"""The export of a Galaxy10-format HDF5 file to class folders, which load_data.py and
preprocess_and_balancing.py share: the flags (`add_export_arguments`), the file downloaded, opened and
checked, then split with a seeded, stratified split (`load_and_split`), every row written as a PNG into
``{train,val}/{label}/img_{index:05d}.png`` by worker processes (`export_images`), the manifest and what the
export came from, all into a hidden folder that becomes the output only once it is complete
(`staged_output`).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from galaxy10.dataset import (
    CHUNK_ROWS,
    DATASET_INFO,
    DEFAULT_H5,
    DOWNLOAD_SIZE,
    DOWNLOAD_URL,
    OFFICIAL_SHA256,
    Galaxy10File,
    open_galaxy10,
)
from galaxy10.download import download, sha256_of
from galaxy10.errors import Galaxy10Error
from galaxy10.files import abandoned, say_removed
from galaxy10.workers import read_worker_rows, run_tasks

MANIFEST_FIELDS: tuple[str, ...] = (
    "index", "label", "class_name", "split", "path", "ra", "dec", "redshift",
)


# ---------------------------------------------------------------- reading and checking the file


def verify_checksum(path: Path, expected: str = OFFICIAL_SHA256) -> None:
    """Compare the file's SHA-256 with the official one (or --sha256's)."""
    actual = sha256_of(path)
    if actual != expected:
        raise Galaxy10Error(f"{path} has SHA-256 {actual}, not the expected {expected}: download it again")


# ---------------------------------------------------------------- the split


def split_rows(labels: np.ndarray, val_size: float = 0.2, seed: int = 42) -> np.ndarray:
    """Seeded stratified split: a bool mask over rows, True for validation.

    load_data.py and preprocess_and_balancing.py both call this, so for the same seed and val size
    the plain and balanced models are validated on exactly the same images.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < val_size < 1:
        raise Galaxy10Error(f"--val-size must be between 0 and 1, got {val_size}")
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        c = int(classes[counts.argmin()])
        raise Galaxy10Error(
            f"class {c} has only {counts.min()} image: a stratified split needs "
            "at least 2 per class; add images of that class"
        )
    try:
        _, val = train_test_split(np.arange(len(labels)), test_size=val_size, stratify=labels,
                                  random_state=seed)
    except ValueError as err:  # e.g. fewer validation rows than classes
        raise Galaxy10Error(f"cannot split {len(labels)} images with --val-size {val_size}: {err}") from None
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val] = True
    return is_val


# ---------------------------------------------------------------- writing the output


def clean_up_killed_exports(out: Path) -> None:
    """Undo what exports into ``out`` that were killed left behind: delete their hidden stage folders,
    and finish a replacement of ``out`` cut short between its two renames (see staged_output)."""
    stages = abandoned(out.parent, f".{out.name}.partial-")
    for stage in stages:
        shutil.rmtree(stage, ignore_errors=True)
    say_removed([stage.name for stage in stages], out.parent, "an export", "exports")
    for old in abandoned(out.parent, f".{out.name}.old-"):
        if out.exists():  # killed after its stage became out: the old output was on its way out
            shutil.rmtree(old, ignore_errors=True)
            print(f"removed {old.name} from {out.parent}, the old {out.name} left by an export killed "
                  "just after replacing it")
        else:  # killed between the renames: the old output is the only complete one
            os.replace(old, out)
            print(f"restored {out} from {old.name}, left by an export killed while replacing it")


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden folder beside ``out`` to write into; it becomes ``out`` only on success."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Galaxy10Error(f"{out} is a file, not a folder: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_up_killed_exports(out)  # first: it may restore an out that the check below must see
    if out.is_dir() and any(out.iterdir()) and not force:
        raise Galaxy10Error(f"{out} already holds files: pass --force to replace it, or choose another --out")
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        # Two renames, not one: a folder cannot replace a non-empty one. A kill between them leaves
        # only the old output, which the next run restores (clean_up_killed_exports).
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def image_relpath(split: str, label: int, index: int) -> str:
    return f"{split}/{label}/img_{index:05d}.png"


def save_png(image: np.ndarray, path: Path) -> None:
    # Level 1: galaxy noise barely compresses, so higher levels cost time for little smaller files.
    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def make_class_folders(stage: Path, labels: np.ndarray) -> None:
    for split in ("train", "val"):
        for label in np.unique(labels):
            (stage / split / str(label)).mkdir(parents=True, exist_ok=True)


def row_ranges(n: int, step: int = CHUNK_ROWS) -> list[tuple[int, int]]:
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _export_range(task: tuple[int, int, np.ndarray, np.ndarray, str]) -> int:
    start, stop, labels, is_val, stage = task
    for offset, image in enumerate(read_worker_rows(slice(start, stop))):
        split = "val" if is_val[offset] else "train"
        save_png(image, Path(stage) / image_relpath(split, int(labels[offset]), start + offset))
    return stop - start


def export_images(source: Galaxy10File, is_val: np.ndarray, stage: Path, workers: int) -> list[dict]:
    """Write every row as a PNG into its split and class folder; return the manifest rows."""
    make_class_folders(stage, source.labels)
    tasks = [(start, stop, source.labels[start:stop], is_val[start:stop], str(stage))
             for start, stop in row_ranges(len(source))]
    run_tasks(source.path, _export_range, tasks, workers, "export", len(source))
    return [manifest_row(source, i, "val" if is_val[i] else "train") for i in range(len(source))]


def manifest_row(source: Galaxy10File, index: int, split: str) -> dict:
    label = int(source.labels[index])
    return {
        "index": index,
        "label": label,
        "class_name": source.class_name(label),
        "split": split,
        "path": image_relpath(split, label, index),
        **{name: repr(float(source.meta[name][index])) for name in ("ra", "dec", "redshift")},
    }


def write_manifest(path: Path, rows: list[dict], fields: Sequence[str] = MANIFEST_FIELDS) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_dataset_info(folder: Path, source: Galaxy10File) -> None:
    """What the export came from, which training records in its checkpoints: the HDF5 file, and whether it
    is sample_data.py's synthetic sample."""
    info = {"h5": str(source.path), "images": len(source), "synthetic": source.synthetic}
    (folder / DATASET_INFO).write_text(json.dumps(info, indent=2) + "\n")


def print_summary(out: Path, rows: list[dict]) -> None:
    counts: dict[tuple[str, int], int] = {}
    names: dict[int, str] = {}
    for row in rows:
        counts[row["split"], row["label"]] = counts.get((row["split"], row["label"]), 0) + 1
        names[row["label"]] = row["class_name"]
    print(f"wrote {len(rows):,} images to {out}/ (manifest: {out / 'manifest.csv'})")
    print(f"{'class':<40}{'train':>8}{'val':>8}")
    for label in sorted(names):
        name = names[label]
        print(f"{label} {name:<38}{counts.get(('train', label), 0):>8}{counts.get(('val', label), 0):>8}")


def add_export_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """The flags load_data.py and preprocess_and_balancing.py share."""
    parser.add_argument("--h5", type=Path, default=Path(DEFAULT_H5),
                        help=f"Galaxy10-format HDF5 file (default: {DEFAULT_H5})")
    parser.add_argument("--out", type=Path, default=Path(default_out),
                        help=f"output folder (default: {default_out})")
    parser.add_argument("--val-size", type=float, default=0.2,
                        help="fraction of each class kept for validation (default: 0.2)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the split (default: 42)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: the number of CPUs)")
    parser.add_argument("--force", action="store_true", help="replace an output folder that holds files")
    parser.add_argument("--verify", action="store_true",
                        help="check the --h5 file's SHA-256 (see --sha256) first")
    parser.add_argument("--download", action="store_true",
                        help=f"first download the --h5 file ({DOWNLOAD_SIZE}) unless it is there, resuming "
                             "an interrupted download, and check its SHA-256")
    parser.add_argument("--url", default=None,
                        help=f"with --download: where from, e.g. a mirror (default: {DOWNLOAD_URL})")
    parser.add_argument("--sha256", default=OFFICIAL_SHA256,
                        help="the SHA-256 that --download and --verify expect (default: the official file's)")


def load_and_split(args: argparse.Namespace) -> tuple[Galaxy10File, np.ndarray]:
    """Download the file (--download), open and check it (and its checksum with --verify), then split it."""
    if args.workers < 1:
        raise Galaxy10Error(f"--workers must be at least 1, got {args.workers}")
    if args.url and not args.download:
        raise Galaxy10Error("--url needs --download")
    if args.download:
        download(args.url or DOWNLOAD_URL, args.h5, args.sha256)
    source = open_galaxy10(args.h5)
    if args.verify:
        verify_checksum(args.h5, args.sha256)
    return source, split_rows(source.labels, args.val_size, args.seed)


