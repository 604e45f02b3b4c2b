"""What every script shares: the Galaxy10 DECaLS dataset's facts (class names, counts, checksum, the
per-row metadata) and its HDF5 file, checked and read in chunks (`open_galaxy10`); the error a user can fix
and the one line a script prints for it (`run_cli`); files written whole (`atomic_path`) and the clean-up
of what killed runs leave; values made from files and kept until the file changes (`FileCache`); and
worker processes that exit with their parent (`process_pool`). It imports none of the scripts.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Generic, TypeVar

import h5py
import numpy as np

T = TypeVar("T")

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
# Per-row float64 metadata stored beside `images` and `ans`.
META_FIELDS: tuple[str, ...] = ("ra", "dec", "redshift", "pxscale")
# What an export folder says of its source (the HDF5 file, and whether it is sample_data.py's synthetic
# sample), beside its manifest; training records it in the checkpoint.
DATASET_INFO = "dataset.json"
SAMPLE_GENERATOR = "sample_data.py"  # the `generator` attribute of the synthetic sample's HDF5 file
# Rows read per HDF5 access: 64 full-size images are 12.6 MB, so a worker's memory stays small.
CHUNK_ROWS = 64


# ---------------------------------------------------------------- errors a user can fix


class Galaxy10Error(Exception):
    """A problem the user can fix. Scripts print it as one line, without a traceback."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``; turn user errors and Ctrl-C into one line and an exit code."""
    try:
        return main(argv) or 0
    except Galaxy10Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was kept from the unfinished step", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: stop quietly, like other shell tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# ---------------------------------------------------------------- the HDF5 file


@dataclass(frozen=True)
class Galaxy10File:
    """A checked Galaxy10-format file: labels and metadata in memory, images left on disk and read in
    chunks (the full file is 2.7 GB). Export needs all of it; inference needs only `images`."""

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


# ---------------------------------------------------------------- files written whole


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary name beside ``path`` to write; renamed onto ``path`` only if the block succeeds,
    so a crash never leaves a truncated file under the real name."""
    path = Path(path)
    tmp = path.with_name(f"{_temporary_prefix(path)}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def abandoned(folder: Path, prefix: str) -> list[Path]:
    """The entries of ``folder`` named ``prefix`` + the id of a process that has ended, by name: what runs
    that were killed (SIGKILL, a time limit) left, since no cleanup of theirs could run. An entry of a
    run still in progress is never among them."""
    found = []
    for entry in folder.iterdir():
        pid = entry.name.removeprefix(prefix)
        if entry.name.startswith(prefix) and pid.isdigit() and not process_alive(int(pid)):
            found.append(entry)
    return sorted(found)


def say_removed(names: list[str], folder: Path, killed_run: str, killed_runs: str) -> None:
    """One line naming what was removed from ``folder`` and which killed run(s) left it."""
    if names:
        by = f"{killed_run} that was killed" if len(names) == 1 else f"{killed_runs} that were killed"
        print(f"removed {', '.join(names)} from {folder}, left by {by}")


def remove_abandoned_temporaries(path: Path) -> None:
    """Delete the temporary files that killed runs of atomic_path(path) left beside ``path``."""
    temporaries = abandoned(path.parent, _temporary_prefix(path))
    for tmp in temporaries:
        tmp.unlink(missing_ok=True)
    say_removed([tmp.name for tmp in temporaries], path.parent, "a run", "runs")


class FileCache(Generic[T]):
    """Values made from files (a prepared model, a checkpoint's record), each made again only when its file
    changes: a new modification time or size. Thread-safe; a value is made once however many threads ask."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[tuple[int, int], T]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, make: Callable[[], T], key: Hashable | None = None) -> T:
        """The value for `path` (under `key`, if one file gives several), made by `make()` when the file is
        new or changed; an OSError from the file's stat (it is gone) reaches the caller."""
        key = path if key is None else key
        with self._lock:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = self._entries.get(key)
            if cached is None or cached[0] != stamp:
                cached = self._entries[key] = (stamp, make())
            return cached[1]


# ---------------------------------------------------------------- worker processes


def process_pool(workers: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple = ()) -> ProcessPoolExecutor:
    """``workers`` worker processes that follow this one: they ignore Ctrl-C (this process handles it
    and shuts the pool down) and exit as soon as this process dies, however it dies. Every process pool
    of the scripts is one of these; ``initializer(*initargs)`` then runs in each worker.
    """
    # spawn, not fork: the parent may hold threads (torch, tqdm) that fork would copy mid-lock.
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(initializer, initargs))


def _start_worker(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent() -> None:
    """Wait for the parent to die, then exit at once: a pool worker otherwise waits forever for tasks
    when its parent is SIGKILLed (an out-of-memory killer, a scheduler), and so does the resource
    tracker, which ends only when every process holding its pipe has ended."""
    # multiprocessing gives each child the read end of a pipe whose only write end the parent holds
    # until it has joined the child, so the pipe reads as closed the moment the parent dies, of any
    # cause and on any OS. Not prctl(PR_SET_PDEATHSIG): it is Linux-only, and it fires when the
    # *thread* that started the worker ends, while a pool starts workers from whichever thread
    # submits (and replacements from its manager thread). Not polling getppid(): a delay and a loop.
    # Was the parent dead before this thread started? Then join returns at once.
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()
        os._exit(1)  # no cleanup to wait for: the parent's successor removes what is left on disk
