"""Speed of sample_data.py: per-image render time and whole-file throughput.

    python benchmarks/bench_sample_data.py                     # the full 17,736 x 256 px file
    python benchmarks/bench_sample_data.py --n 2000 --image-size 64

Target: the full-size file in <= 90 s on 2 cores (about 200 images/s). The file is written to a
temporary folder and deleted afterwards; figures go to stdout and benchmarks/results/bench_sample_data.json
(`make results` renders it).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from galaxy10 import synthetic
from galaxy10.dataset import CLASS_NAMES
from galaxy10.errors import run_cli

import record

COLUMNS = [
    {"key": "images", "label": "images", "format": ","},
    {"key": "image_size", "label": "px", "format": "d"},
    {"key": "wall_s", "label": "seconds", "format": ".1f"},
    {"key": "images_per_s", "label": "images/s", "format": ".0f"},
    {"key": "file_gb", "label": "file GB", "format": ".2f"},
]


def render_ms_per_class(image_size: int, per_class: int) -> dict[str, float]:
    """Median single-process milliseconds to render one image, per class."""
    timings = {}
    for label, name in enumerate(CLASS_NAMES):
        samples = []
        for i in range(per_class):
            rng = np.random.default_rng([0, label, i])
            start = time.perf_counter()
            synthetic.render_galaxy(label, rng, image_size)
            samples.append((time.perf_counter() - start) * 1000)
        timings[name] = float(np.median(samples))
    return timings


def time_write(n: int, image_size: int, workers: int) -> dict[str, float]:
    """Wall time and size of writing a whole file, deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench_sample_data-") as folder:
        path = Path(folder) / "sample.h5"
        start = time.perf_counter()
        synthetic.write_sample(path, n=n, image_size=image_size, workers=workers)
        wall = time.perf_counter() - start
        size = path.stat().st_size
    return {"wall_s": wall, "images_per_s": n / wall, "file_gb": size / 1e9}


def main(argv: Sequence[str] | None = None) -> None:
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=17736,
                        help="images to write (default: 17736, the full file)")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels (default: 256)")
    parser.add_argument("--workers", type=int, default=cpus,
                        help=f"rendering processes (default: the CPU count, {cpus} here)")
    parser.add_argument("--per-class", type=int, default=20,
                        help="images per class for the single-process render timing (default: 20)")
    args = parser.parse_args(argv)
    synthetic.class_counts(args.n)  # a bad --n fails here, before the timings

    per_class = render_ms_per_class(args.image_size, args.per_class)
    write = time_write(args.n, args.image_size, args.workers)
    result = {
        "n": args.n, "image_size": args.image_size, "workers": args.workers, "cpus": cpus,
        "machine": platform.processor() or platform.machine(),
        "render_ms_per_image_by_class": per_class,
        "render_ms_per_image_mean": float(np.mean(list(per_class.values()))),
        **write,
    }
    print(f"\n{'class':<36}{'render ms/img':>14}")
    for name, ms in per_class.items():
        print(f"{name:<36}{ms:>14.2f}")
    print(f"\n{'images':<36}{args.n:>14}")
    print(f"{'image size (px)':<36}{args.image_size:>14}")
    print(f"{'workers':<36}{args.workers:>14}")
    print(f"{'wall time (s)':<36}{write['wall_s']:>14.1f}")
    print(f"{'images/s':<36}{write['images_per_s']:>14.1f}")
    print(f"{'file size (GB)':<36}{write['file_gb']:>14.2f}")
    metrics = {"images": args.n, "image_size": args.image_size, "workers": args.workers, **write}
    row = record.row(f"{args.n} images at {args.image_size} px", record.command(__file__, argv), metrics)
    record.write("bench_sample_data", [row], title="Sample generation (`sample_data.py`)", columns=COLUMNS,
                 last_run=result)


if __name__ == "__main__":
    sys.exit(run_cli(main))
