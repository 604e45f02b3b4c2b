"""Worker processes that exit with their parent (`process_pool`), and the export's tasks run in them over a
Galaxy10 HDF5 file that each worker opens once (`run_tasks`, `read_worker_rows`).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np

from galaxy10.dataset import read_rows
from galaxy10.progress import progress_bar

T = TypeVar("T")

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


# ---------------------------------------------------------------- tasks over an HDF5 file

_worker_images: h5py.Dataset | None = None  # each worker process opens the HDF5 file once


def _open_images(h5_path: str) -> None:
    global _worker_images
    _worker_images = h5py.File(h5_path, "r")["images"]


def _close_images() -> None:
    global _worker_images
    if _worker_images is not None:
        _worker_images.file.close()
    _worker_images = None


def read_worker_rows(rows: np.ndarray | slice) -> np.ndarray:
    """Rows of the images of the file this worker process opened (a task of `run_tasks` calls it)."""
    if _worker_images is None:
        raise RuntimeError("read_worker_rows runs in a task of run_tasks, which opens the file")
    return read_rows(_worker_images, rows)


def run_tasks(h5_path: Path, fn: Callable[[T], int], tasks: list[T], workers: int, desc: str,
              total: int) -> None:
    """Run ``fn`` over ``tasks`` (each returns how many images it wrote) in ``workers`` processes that each
    open the HDF5 file once, with a progress bar over ``total`` images."""
    with progress_bar(total=total, desc=desc, unit="img") as bar:
        if workers <= 1:
            _open_images(str(h5_path))
            try:
                for task in tasks:
                    bar.update(fn(task))
            finally:
                _close_images()
            return
        with process_pool(workers, _open_images, (str(h5_path),)) as pool:
            futures = [pool.submit(fn, task) for task in tasks]
            try:
                for future in as_completed(futures):
                    bar.update(future.result())
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
