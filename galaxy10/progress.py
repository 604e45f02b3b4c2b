"""Progress on long work: a live tqdm bar in a terminal; where the output goes to a file (a log, a SLURM
job, a pipe) plain lines instead, one every `LINE_SECONDS` and one at the end, so a log holds no
carriage-return frames and every line can be grepped. Every progress bar of the project is made here
(`progress_bar`), and lines printed while one runs go through `write`.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

LINE_SECONDS = 30.0  # between two plain progress lines: a log line per half minute of work at most


def interactive() -> bool:
    """A person watches a terminal: both streams are one (output redirected to a file means a log)."""
    return sys.stderr.isatty() and sys.stdout.isatty()


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, leave: bool = True, disable: bool = False,
                 unit_scale: bool = False) -> tqdm | PlainProgress:
    """A tqdm bar in a terminal, else `PlainProgress`; both iterate, `update`, `set_postfix` and close as
    context managers. `leave=False` bars (an epoch's) say nothing at their end in a log: the caller's own
    line follows."""
    if interactive():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                    disable=disable, unit_scale=unit_scale, unit_divisor=1024 if unit_scale else 1000)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                         disable=disable, unit_scale=unit_scale)


def write(line: str, file: TextIO | None = None) -> None:
    """Print a line while a bar may be showing (a live bar is cleared and redrawn around it)."""
    if interactive():
        tqdm.write(line, file=file)
    else:
        print(line, file=file or sys.stdout, flush=True)


class PlainProgress:
    """Progress as plain lines on stderr: "desc: 1,024/10,000 img (10%), 35.2 img/s, 4m15s left"."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, leave: bool = True, disable: bool = False,
                 unit_scale: bool = False) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.leave, self.disable = total, desc, unit, leave, disable
        self.unit_scale = unit_scale
        self.n = self.start_n = initial
        self.postfix = ""
        self.started = self.last_line = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_line >= LINE_SECONDS:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def close(self) -> None:
        if not self.closed and self.leave:
            self._line(done=True)
        self.closed = True

    def _line(self, done: bool = False) -> None:
        self.last_line = time.monotonic()
        if self.disable:
            return
        elapsed = self.last_line - self.started
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        amount = self._amount(self.n)
        if self.total:
            share = f"{self.n / self.total:.0%}"
            amount = f"{self._amount(self.n, unit=False)}/{self._amount(self.total)} ({share})"
        parts = [amount, f"{self._amount(rate)}/s"]
        if done:
            parts.append(f"done in {duration(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"{duration((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        print(f"{self.desc}: {', '.join(parts)}", file=sys.stderr, flush=True)

    def _amount(self, value: float, unit: bool = True) -> str:
        """1,024 img; 3.5 MiB with unit_scale (bytes); 0.25 img/s for a rate under one."""
        suffix = self.unit if unit else ""
        if self.unit_scale:
            prefix = ""
            for prefix in ("", "Ki", "Mi", "Gi"):
                if abs(value) < 1024 or prefix == "Gi":
                    break
                value /= 1024
            return f"{value:.1f} {prefix}{suffix}".rstrip()
        number = f"{value:,.0f}" if value >= 1 or value == 0 else f"{value:.2f}"
        return f"{number} {suffix}".rstrip()


def duration(seconds: float) -> str:
    """12s, 4m15s, 2h03m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
