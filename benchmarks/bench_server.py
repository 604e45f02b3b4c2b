"""Load and fault benchmark of the web server (main.py), on loopback only.

    python benchmarks/bench_server.py                                    # 256 px model, 500 requests
    python benchmarks/bench_server.py --image-size 64 --requests 100     # a quick run

Starts `python main.py` on 127.0.0.1 with a random-initialised checkpoint (made in a temporary
folder), sends --requests predictions from --clients concurrent clients to /api/predict with real
galaxy images, then a battery of malformed uploads to both upload routes. Fails (exit 1) on any
error under load, any 5xx, or a server that no longer answers /healthz. The row goes to
benchmarks/results/bench_server.json (`make results` renders it).
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import numpy as np
import psutil
from PIL import Image

from galaxy10.dataset import CLASS_NAMES
from galaxy10.models import Checkpoint, ModelRecord
from galaxy10.networks import DEFAULT_ARCH, CNNModel
from galaxy10.preprocessing import Preprocessing

import record

ROOT = Path(__file__).resolve().parents[1]

REAL_IMAGES = ROOT.parent / "shared" / "real_galaxy10" / "images"
MODEL_NAME = "based_on_balanced_data_model"
MAX_UPLOAD_MB = 10
COLUMNS = [
    {"key": "requests", "label": "requests", "format": "d"},
    {"key": "errors", "label": "errors", "format": "d"},
    {"key": "requests_per_s", "label": "requests/s", "format": ".1f"},
    {"key": "p50_ms", "label": "p50 ms", "format": ".0f"},
    {"key": "p99_ms", "label": "p99 ms", "format": ".0f"},
    {"key": "malformed_uploads", "label": "malformed uploads", "format": "d"},
    {"key": "malformed_5xx", "label": "5xx", "format": "d"},
    {"key": "healthy_after", "label": "healthy after", "format": ""},
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="predictions sent in all (default: 500)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--image-size", type=int, default=256, help="model input size in px (default: 256)")
    parser.add_argument(
        "--images", type=Path, default=REAL_IMAGES, help=f"galaxy images to send (default: {REAL_IMAGES}; "
        "generated ones where absent)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=1800, help="stop sending after this long (default: 1800)"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_server.json",
        help="result file, benchmarks/record.py's format (default: benchmarks/results/bench_server.json)",
    )
    return parser.parse_args()


# ---------------------------------------------------------------- the server


def write_checkpoint(folder: Path, image_size: int) -> None:
    record = ModelRecord(DEFAULT_ARCH, CLASS_NAMES, Preprocessing(image_size))
    Checkpoint(record, CNNModel(image_size=image_size).state_dict()).save(folder / f"{MODEL_NAME}.pth")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(models: Path, port: int, log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable, str(ROOT / "main.py"), "--models-dir", str(models), "--port", str(port),
        "--max-upload-mb", str(MAX_UPLOAD_MB),
    ]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}):\n{log_path.read_text()}")
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not answer /healthz within 300 s")


# ---------------------------------------------------------------- load


def load_images(folder: Path) -> list[tuple[str, bytes]]:
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if files:
        return [(p.name, p.read_bytes()) for p in files]
    rng = np.random.default_rng(0)
    return [
        (f"generated_{i}.png", encode(Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))))
        for i in range(20)
    ]


def run_load(
    base: str, images: list[tuple[str, bytes]], requests: int, clients: int, max_seconds: float
) -> dict:
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + max_seconds

    def client_loop() -> None:
        with httpx.Client(base_url=base, timeout=120) as client:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = images[i % len(images)]
                start = time.perf_counter()
                try:
                    response = client.post("/api/predict", files={"file": (name, data)})
                    problem = None if response.status_code == 200 else f"{name}: HTTP {response.status_code}"
                except httpx.HTTPError as err:
                    problem = f"{name}: {type(err).__name__}"
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if problem:
                        failures.append(problem)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client_loop)
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "errors": len(failures),
        "first_errors": failures[:5],
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


# ---------------------------------------------------------------- malformed uploads


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG of a few dozen bytes whose header declares width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def malformed_uploads(galaxy: bytes) -> list[tuple[str, str, bytes]]:
    """(case, file name, bytes): everything a careless or hostile client might send."""
    rgb = Image.open(io.BytesIO(galaxy)).convert("RGB")
    png, jpeg = encode(rgb), encode(rgb, "JPEG")
    deep = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    return [
        ("empty file", "empty.png", b""),
        ("random bytes", "noise.png", np.random.default_rng(0).bytes(8192)),
        ("truncated PNG", "cut.png", png[: len(png) // 2]),
        ("truncated JPEG", "cut.jpg", jpeg[: len(jpeg) // 2]),
        ("PNG named .jpg", "png.jpg", png),
        ("text named .png", "text.png", b"not an image at all\n" * 50),
        ("1x1 PNG", "dot.png", encode(Image.new("RGB", (1, 1), (200, 180, 90)))),
        ("16-bit PNG", "deep.png", encode(deep)),
        ("CMYK JPEG", "cmyk.jpg", encode(rgb.convert("CMYK"), "JPEG")),
        ("RGBA PNG", "alpha.png", encode(rgba)),
        ("greyscale PNG", "grey.png", encode(rgb.convert("L"))),
        ("GIF", "galaxy.gif", encode(rgb.convert("P"), "GIF")),
        ("animated GIF", "anim.gif", animated.getvalue()),
        ("TIFF", "galaxy.tiff", encode(rgb, "TIFF")),
        ("BMP", "galaxy.bmp", encode(rgb, "BMP")),
        ("WebP", "galaxy.webp", encode(rgb, "WEBP")),
        ("decompression bomb", "bomb.png", bomb_png()),
        ("path traversal name", "../templates/index.html", png),
        (f"over {MAX_UPLOAD_MB} MB", "huge.png", b"\0" * (MAX_UPLOAD_MB * 2**20 + 1)),
    ]


def run_faults(base: str, galaxy: bytes) -> list[dict]:
    results = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for case, name, data in malformed_uploads(galaxy):
            row = {"case": case}
            for route in ("/api/predict", "/upload-file/"):
                try:
                    row[route] = client.post(route, files={"file": (name, data)}).status_code
                except httpx.HTTPError as err:
                    row[route] = type(err).__name__
            results.append(row)
    return results


# ---------------------------------------------------------------- report


def main() -> int:
    args = parse_args()
    images = load_images(args.images)
    with tempfile.TemporaryDirectory(prefix="bench_server_") as tmp:
        models = Path(tmp)
        print(f"writing a random {args.image_size} px checkpoint ...", flush=True)
        write_checkpoint(models, args.image_size)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        server = start_server(models, port, models / "server.log")
        startup_s = time.perf_counter() - started
        idle_rss_mb = psutil.Process(server.pid).memory_info().rss / 2**20
        try:
            print(f"server up in {startup_s:.1f} s; {args.requests} requests from {args.clients} clients ...")
            load = run_load(base, images, args.requests, args.clients, args.max_seconds)
            rss_mb = psutil.Process(server.pid).memory_info().rss / 2**20
            faults = run_faults(base, images[0][1])
            healthz = httpx.get(base + "/healthz", timeout=30).status_code
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()

    print(f"\nload: {args.image_size} px model, {args.clients} clients, {len(images)} distinct images")
    print(f"  requests     {load['requests']}")
    print(f"  errors       {load['errors']}  {load['first_errors'] or ''}")
    print(f"  requests/s   {load['requests_per_s']:.2f}")
    print(f"  p50 latency  {load['p50_ms']:.0f} ms")
    print(f"  p99 latency  {load['p99_ms']:.0f} ms")
    print(f"  server RSS   {idle_rss_mb:.0f} MB started, {rss_mb:.0f} MB after the load")
    print(f"\n{'malformed upload':<26}{'/api/predict':>14}{'/upload-file/':>15}")
    for row in faults:
        print(f"{row['case']:<26}{row['/api/predict']!s:>14}{row['/upload-file/']!s:>15}")
    print(f"\n/healthz afterwards: {healthz}")

    statuses = [row[route] for row in faults for route in ("/api/predict", "/upload-file/")]
    server_errors = [s for s in statuses if not isinstance(s, int) or s >= 500]
    ok = load["errors"] == 0 and load["requests"] == args.requests and not server_errors and healthz == 200
    results = {
        "image_size": args.image_size, "clients": args.clients, "cpu_count": os.cpu_count(),
        "startup_s": startup_s, "idle_rss_mb": idle_rss_mb, "server_rss_mb": rss_mb,
        "load": load, "faults": faults,
        "healthz_after": healthz, "ok": ok,
    }
    metrics = {key: load[key] for key in ("requests", "errors", "requests_per_s", "p50_ms", "p99_ms")}
    metrics.update(malformed_uploads=len(faults), malformed_5xx=len(server_errors),
                   healthy_after="yes" if healthz == 200 else f"no ({healthz})")
    row = record.row(f"/api/predict, {args.image_size} px, {args.clients} clients", record.command(__file__),
                     metrics)
    record.write(args.out.stem, [row], title="Web server (`main.py`)", columns=COLUMNS, last_run=results,
                 folder=args.out.parent)
    if not ok:
        print("FAILED: errors under load, a 5xx or a dead server", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
