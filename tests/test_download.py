"""download.py through load_data.py --download: a full download, resuming after an interruption (in the
process, and of a killed script), a wrong checksum, a server without Range support, and unreachable or
failing servers; all against a local HTTP server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import http.server
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import load_data
from galaxy10.download import download, part_path
from galaxy10.errors import run_cli

from helpers import ROOT, assert_one_line_error, kill_when, listening_socket, random_galaxy10

COUNTS = [6, 9, 14, 11, 3, 10, 9, 13, 7, 9]  # 91 images of 32 px: a 280 KB Galaxy10-format file
PIECE = 16 << 10  # bytes the server writes at a time


@dataclass
class Behaviour:
    """What the test server does: the file it serves, whether it honours Range, whether it cuts the next
    response short, whether it holds a response after some bytes until released; and the Range header of
    every request it saw (None: none)."""

    data: bytes
    honours_range: bool = True
    cut_after: int | None = None  # close the connection after this many body bytes, once
    hold_after: int | None = None  # send this many body bytes of the next response, then wait for `release`
    release: threading.Event = field(default_factory=threading.Event)
    ranges: list[str | None] = field(default_factory=list)


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves Behaviour.data at any path: 206 for ``Range: bytes=N-`` (416 past the end), else 200."""

    server: FileServer

    def do_GET(self) -> None:
        serve = self.server.behaviour
        asked = self.headers.get("Range")
        serve.ranges.append(asked)
        if self.path != "/Galaxy10_DECals.h5":
            self.send_error(404)
            return
        match = re.fullmatch(r"bytes=(\d+)-", asked or "")
        start = int(match[1]) if match and serve.honours_range else 0
        if start >= len(serve.data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(serve.data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(serve.data) - 1}/{len(serve.data)}")
        self.send_header("Content-Length", str(len(serve.data) - start))
        self.end_headers()
        body = serve.data[start:]
        if serve.cut_after is not None:
            body, serve.cut_after = body[:serve.cut_after], None
        hold, serve.hold_after = serve.hold_after, None
        self.send(body, hold, serve.release)

    def send(self, body: bytes, hold: int | None, release: threading.Event) -> None:
        try:
            for offset in range(0, len(body), PIECE):
                if hold is not None and offset >= hold:
                    self.wfile.flush()
                    release.wait(timeout=120)  # the test kills the client meanwhile, then releases
                    hold = None
                self.wfile.write(body[offset:offset + PIECE])
        except ConnectionError:  # the client was killed mid-transfer, as a test means it to be
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Quiet: pytest shows the test's own output only."""


class FileServer(http.server.ThreadingHTTPServer):
    behaviour: Behaviour


@pytest.fixture
def h5(tmp_path: Path) -> Path:
    (tmp_path / "served").mkdir()
    return random_galaxy10(tmp_path / "served" / "source.h5", COUNTS)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """Where the tests download to: a folder of its own, so that they can check all that is in it."""
    (tmp_path / "dl").mkdir()
    return tmp_path / "dl" / "Galaxy10_DECals.h5"


@pytest.fixture
def server(h5: Path) -> Iterator[tuple[str, Behaviour]]:
    """The URL of the file on a local server, and the Behaviour to set and read."""
    httpd = FileServer(("127.0.0.1", 0), RangeHandler)
    httpd.behaviour = Behaviour(h5.read_bytes())
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)  # quick shutdown
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/Galaxy10_DECals.h5", httpd.behaviour
    httpd.shutdown()
    httpd.server_close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_and_export(url: str, target: Path, sha: str, *extra: str) -> int:
    out = target.parent / "data"
    return run_cli(load_data.main, ["--download", "--url", url, "--sha256", sha, "--h5", str(target),
                                    "--out", str(out), "--workers", "1", *extra])


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------- downloads that succeed


def test_full_download_is_checked_renamed_and_exported(server, target: Path, capsys) -> None:
    url, serve = server
    assert download_and_export(url, target, sha256(serve.data)) == 0
    assert target.read_bytes() == serve.data
    assert names(target.parent) == {"Galaxy10_DECals.h5", "data"}  # no .part left
    assert (target.parent / "data" / "manifest.csv").is_file()
    assert serve.ranges == [None]
    assert f"downloaded {target}" in capsys.readouterr().out


def test_existing_file_is_not_downloaded_again(server, target: Path, capsys) -> None:
    url, serve = server
    target.write_bytes(serve.data)
    download(url, target, sha256(serve.data))
    assert serve.ranges == []
    assert capsys.readouterr().out.strip().splitlines() == [
        f"{target} is already here, not downloading it again (delete it to download it again)"
    ]


def test_interrupted_download_resumes_with_a_range_request(server, target: Path, capsys) -> None:
    url, serve = server
    cut = 100_000
    serve.cut_after = cut
    assert download_and_export(url, target, sha256(serve.data)) == 2
    assert_one_line_error(capsys, f"stopped at {cut:,} of {len(serve.data):,} bytes", target.name + ".part",
                          "run the same command again to resume")
    assert names(target.parent) == {target.name + ".part"}  # nothing under the real name, no export
    assert part_path(target).read_bytes() == serve.data[:cut]

    assert download_and_export(url, target, sha256(serve.data)) == 0
    assert serve.ranges == [None, f"bytes={cut}-"]
    assert target.read_bytes() == serve.data
    assert names(target.parent) == {target.name, "data"}


def test_a_part_that_is_already_whole_is_checked_and_renamed(server, target: Path) -> None:
    url, serve = server
    part_path(target).write_bytes(serve.data)  # killed after the last byte, before the rename
    download(url, target, sha256(serve.data))
    assert serve.ranges == [f"bytes={len(serve.data)}-"]  # answered 416
    assert target.read_bytes() == serve.data and not part_path(target).exists()


def test_server_without_range_support_starts_over(server, target: Path, capsys) -> None:
    url, serve = server
    serve.honours_range = False
    part_path(target).write_bytes(serve.data[:50_000])
    download(url, target, sha256(serve.data))
    assert serve.ranges == ["bytes=50000-"]  # asked, and got the whole file with a 200
    assert target.read_bytes() == serve.data and not part_path(target).exists()
    assert "does not resume downloads: starting again from the beginning" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_script_leaves_only_the_part_and_the_next_run_resumes(server, target: Path) -> None:
    url, serve = server
    serve.hold_after = 3 * PIECE  # the server sends 3 pieces and waits: the kill lands mid-transfer
    part = part_path(target)
    script = subprocess.Popen(
        [sys.executable, str(ROOT / "load_data.py"), "--download", "--url", url, "--sha256",
         sha256(serve.data), "--h5", str(target), "--out", str(target.parent / "data"), "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    kill_when(script, lambda: part.exists() and part.stat().st_size >= 3 * PIECE)
    serve.release.set()
    kept = part.stat().st_size
    assert kept == 3 * PIECE < len(serve.data)
    assert names(target.parent) == {part.name}

    assert download_and_export(url, target, sha256(serve.data)) == 0
    assert serve.ranges == [None, f"bytes={kept}-"]
    assert target.read_bytes() == serve.data


# ---------------------------------------------------------------- downloads that fail


def test_wrong_checksum_keeps_nothing(server, target: Path, capsys) -> None:
    url, serve = server
    assert download_and_export(url, target, "0" * 64) == 2
    assert_one_line_error(capsys, f"SHA-256 {sha256(serve.data)}, not {'0' * 64}",
                          "run the same command again")
    assert names(target.parent) == set()


def test_malformed_checksum_fails_before_any_request(server, target: Path, capsys) -> None:
    url, serve = server
    assert download_and_export(url, target, "abc") == 2
    assert_one_line_error(capsys, "SHA-256 must be 64 hexadecimal digits", "'abc'")
    assert serve.ranges == [] and names(target.parent) == set()


def test_unreachable_url_is_one_line(target: Path, capsys) -> None:
    with listening_socket() as sock:  # a port that was free; closed, so nothing answers there
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/Galaxy10_DECals.h5"
    assert download_and_export(url, target, "0" * 64) == 2
    assert_one_line_error(capsys, f"cannot reach {url}", "download it by hand", "--h5")
    assert names(target.parent) == set()  # no empty .part either


def test_http_error_is_one_line(server, target: Path, capsys) -> None:
    url, _ = server
    missing = url.replace("Galaxy10_DECals.h5", "missing.h5")
    assert download_and_export(missing, target, "0" * 64) == 2
    assert_one_line_error(capsys, f"{missing} answered HTTP 404")
    assert names(target.parent) == set()


def test_bad_url_and_url_without_download(target: Path, capsys) -> None:
    assert download_and_export("not a url", target, "0" * 64) == 2
    assert_one_line_error(capsys, "not a url is not a URL")
    assert run_cli(load_data.main, ["--url", "http://127.0.0.1:1/x", "--h5", str(target)]) == 2
    assert_one_line_error(capsys, "--url needs --download")
