"""Fetch one file by HTTP into place, resumable and checked: ``download(url, target, sha256)``.

The bytes go to ``<target>.part`` beside the target, so an interrupted transfer (a dropped connection,
Ctrl-C, a killed job) keeps what arrived and the next run asks the server only for the rest
(``Range: bytes=N-``). The part file becomes the target (os.replace) only once it is complete and its
SHA-256 matches, so nothing half-written or wrong ever sits under the real name. Standard library only
(urllib.request): a step a user runs once adds no dependency.
"""
from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from galaxy10.errors import Galaxy10Error
from galaxy10.progress import progress_bar

BLOCK = 1 << 20  # bytes read, written and hashed at a time
TIMEOUT_S = 60  # a connection that stalls this long fails (and can be resumed) instead of hanging forever


def part_path(target: Path) -> Path:
    """Where the bytes of ``target`` collect until it is complete and checked."""
    return target.with_name(f"{target.name}.part")


def download(url: str, target: Path, sha256: str) -> None:
    """Make ``target`` the file at ``url`` whose SHA-256 is ``sha256``, resuming a part file left by an
    interrupted run; an existing ``target`` is kept as it is (downloading it again is never implicit)."""
    target = Path(target)
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):  # caught before the transfer, not after it
        raise Galaxy10Error(f"the expected SHA-256 must be 64 hexadecimal digits, got {sha256!r}")
    if target.exists():
        print(f"{target} is already here, not downloading it again (delete it to download it again)")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(target)
    with part.open("ab") as f:
        hold_exclusively(f, part)
        try:
            fetch_rest(url, f, part)
        except BaseException:
            if not size_of(f):  # nothing arrived, so nothing to resume: leave no empty part behind
                part.unlink()
            raise
        check_sha256(part, sha256.lower())
        os.replace(part, target)
    print(f"downloaded {target} ({target.stat().st_size:,} bytes, SHA-256 checked)")


def hold_exclusively(f: BinaryIO, part: Path) -> None:
    """Two runs appending to one part file would interleave their bytes: the second one stops instead."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Galaxy10Error(f"another download into {part} is running: let it finish") from None


def fetch_rest(url: str, f: BinaryIO, part: Path) -> None:
    """Append to ``f`` what the server holds beyond the bytes already in it (all of it when it is empty)."""
    have = os.fstat(f.fileno()).st_size
    try:
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    except ValueError as err:  # no scheme, or one urllib does not speak
        raise Galaxy10Error(f"{url} is not a URL to download from ({err})") from None
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            start, total = where_body_starts(response, f, have, url)
            copy_body(response, f, start, total, part)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and have:  # nothing beyond `have`: the part is whole, or the checksum will say not
            return
        raise Galaxy10Error(f"{url} answered HTTP {err.code} {err.reason}: check the URL") from None
    except urllib.error.URLError as err:  # no network, unknown host, refused
        raise Galaxy10Error(
            f"cannot reach {url} ({err.reason}): download it by hand and pass its path with --h5"
        ) from None
    except (OSError, http.client.HTTPException) as err:  # the server hung up or stalled before the body
        raise Galaxy10Error(
            f"{url} failed before sending the file ({describe(err)}): run the same command again, "
            "or download it by hand and pass its path with --h5"
        ) from None


def where_body_starts(response: http.client.HTTPResponse, f: BinaryIO, have: int,
                      url: str) -> tuple[int, int | None]:
    """The file offset of the response's first byte and the file's full size (None if the server does not
    say): ``have`` for a 206 answer to our Range, 0 after emptying the part when the server sends it all."""
    if response.status == 206:
        start, total = parse_content_range(response.headers.get("Content-Range", ""))
        if start != have:
            raise Galaxy10Error(f"{url} sent bytes from {start} when asked for {have}: try another --url")
        return start, total
    if have:
        print(f"{url} does not resume downloads: starting again from the beginning")
        f.truncate(0)
    length = response.headers.get("Content-Length", "")
    return 0, int(length) if length.isdigit() else None


def parse_content_range(value: str) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` (TOTAL may be ``*``) as (START, TOTAL)."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    if not match:
        raise Galaxy10Error(f"the server answered a Range request with Content-Range {value!r}")
    return int(match[1]), int(match[2]) if match[2].isdigit() else None


def copy_body(response: http.client.HTTPResponse, f: BinaryIO, start: int, total: int | None,
              part: Path) -> None:
    """Append the response to ``f`` with a progress bar; whatever stops it short keeps the bytes that came,
    for the next run to resume from."""
    with progress_bar(total=total, initial=start, unit="B", unit_scale=True, desc=part.name) as bar:
        try:
            while block := response.read1(BLOCK):  # what has arrived: the bar and the part keep up
                f.write(block)
                bar.update(len(block))
        except (OSError, http.client.HTTPException) as err:  # reset, timeout, disk full
            raise stopped(f, part, total, describe(err)) from None
        except KeyboardInterrupt:  # Ctrl-C keeps the part: say so, not run_cli's "nothing was kept"
            raise stopped(f, part, total, "interrupted") from None
    if total is not None and size_of(f) < total:
        raise stopped(f, part, total, "the connection closed early")


def size_of(f: BinaryIO) -> int:
    f.flush()
    return os.fstat(f.fileno()).st_size


def describe(err: BaseException) -> str:
    return str(err) or type(err).__name__  # a timeout's or IncompleteRead's str() can be empty


def stopped(f: BinaryIO, part: Path, total: int | None, why: str) -> Galaxy10Error:
    """The one line for a transfer cut short: the part file stays, and the same command resumes it."""
    of = f" of {total:,}" if total is not None else ""
    return Galaxy10Error(f"the download stopped at {size_of(f):,}{of} bytes ({why}): {part} keeps them; "
                         "run the same command again to resume")


def check_sha256(part: Path, expected: str) -> None:
    """A wrong file must not become the target, nor be resumed from: a mismatch deletes it."""
    actual = sha256_of(part)
    if actual != expected:
        part.unlink()
        raise Galaxy10Error(f"the downloaded file has SHA-256 {actual}, not {expected}, and was deleted: "
                            "run the same command again (or check --sha256)")


def sha256_of(path: Path) -> str:
    """The file's SHA-256, with a progress bar: the full dataset takes a while to read."""
    digest = hashlib.sha256()
    with path.open("rb") as f, progress_bar(total=path.stat().st_size, unit="B", unit_scale=True,
                                           desc="sha256") as bar:
        while block := f.read(BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()
