"""Files written whole (`atomic_path`), the clean-up of what killed runs leave beside them (`abandoned`,
`remove_abandoned_temporaries`), and values made from files and kept until the file changes (`FileCache`).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")



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


