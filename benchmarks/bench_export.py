"""Export speed and peak memory: load_data.py against the original approach, in the same run.

    python benchmarks/bench_export.py                 # 4,000 sample images at 256 px
    python benchmarks/bench_export.py --n 8000        # memory must stay flat as the file grows

The original read the whole `images` array into RAM, then wrote one PNG at a time with PIL's
defaults. Each approach runs in its own process; peak memory is the largest sum of resident memory
over that process and its children, sampled every 20 ms. Rows go to benchmarks/results/bench_export.json
(`make results` renders it).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from galaxy10 import synthetic

import record

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    {"key": "images", "label": "images", "format": ","},
    {"key": "image_size", "label": "px", "format": "d"},
    {"key": "images_per_s", "label": "images/s", "format": ".0f"},
    {"key": "peak_mb", "label": "peak MB", "format": ",.0f"},
    {"key": "speedup", "label": "speed-up", "format": ".2f"},
]
ORIGINAL = """
import os, sys, h5py, numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

h5, out = sys.argv[1], sys.argv[2]
with h5py.File(h5, "r") as f:
    images, labels = np.array(f["images"]), np.array(f["ans"])
train, val = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=42)
for split, rows in (("train", train), ("val", val)):
    for i in rows:
        folder = os.path.join(out, split, str(labels[i]))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(images[i]).save(os.path.join(folder, f"img_{i:05d}.png"))
"""


def measure(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MB, process tree summed) of one command."""
    start = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"{command} failed with exit code {process.returncode}")
    return seconds, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4000, help="sample images (default: 4000)")
    parser.add_argument("--image-size", type=int, default=256, help="image side in px (default: 256)")
    parser.add_argument("--workers", type=int, default=psutil.cpu_count() or 1,
                        help="load_data.py worker processes (default: the number of CPUs)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        h5 = Path(tmp) / "sample.h5"
        print(f"generating {args.n} sample images at {args.image_size} px ...", flush=True)
        synthetic.write_sample(h5, n=args.n, seed=0, image_size=args.image_size, progress=False)
        runs = {
            "original (whole array, one PNG at a time)":
                measure([sys.executable, "-c", ORIGINAL, str(h5), f"{tmp}/original"]),
            "load_data.py (chunks, workers)":
                measure([sys.executable, str(ROOT / "load_data.py"), "--h5", str(h5), "--out",
                         f"{tmp}/ours", "--workers", str(args.workers)]),
        }
    (original_s, original_mb), (ours_s, ours_mb) = runs.values()
    print(f"\n{args.n} images at {args.image_size} px, {psutil.cpu_count()} CPUs")
    print(f"{'approach':<44}{'seconds':>9}{'images/s':>10}{'peak MB':>9}")
    for name, (seconds, mb) in runs.items():
        print(f"{name:<44}{seconds:>9.1f}{args.n / seconds:>10.0f}{mb:>9.0f}")
    print(f"speed-up: {original_s / ours_s:.2f}x (target >= 1.7x); "
          f"peak RSS {ours_mb:.0f} MB (target <= 400 MB)")
    cmd, size = record.command(__file__), {"images": args.n, "image_size": args.image_size}
    rows = [record.row(name, cmd, {**size, "seconds": s, "images_per_s": args.n / s, "peak_mb": mb})
            for name, (s, mb) in runs.items()]
    rows[1]["metrics"].update(workers=args.workers, speedup=original_s / ours_s)
    record.write("bench_export", rows, title="Export (`load_data.py` against the original)", columns=COLUMNS)


if __name__ == "__main__":
    main()
