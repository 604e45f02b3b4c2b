"""Catalog prediction: one process against torchrun's two on the same catalog, and memory against rows.

    python benchmarks/bench_catalog.py                       # 20,000 rows: speed and peak memory
    python benchmarks/bench_catalog.py --memory 1000 100000 --model-size 32 --png-size 64

The second checks that peak memory does not grow with the rows (bound: 1.2x); the smaller model and
images only make 100,000 rows quicker to run. The catalog is built from the built-in sample:
sample_data.py renders --images galaxies at --png-size (256 px, a survey cutout's size), they are
exported as PNG files, and a CSV catalog names them in turn until it has --rows rows (so after the
first pass the files come from the page cache: disk speed is not measured). The model is a randomly
initialised --model-size checkpoint: a forward pass costs the same whatever the weights.
Each run is `cnn_use_model.py CATALOG --out FILE.parquet --id-column objid` in its own process tree:
one process with 2 threads, then `torchrun --standalone --nproc_per_node 2` with 1 thread per process.
Seconds include starting Python, importing torch and loading the model, so each mode is also timed on a
--startup-rows catalog and images/s are given with and without that fixed cost. Peak memory is the
process tree's summed resident memory (bench_export.measure; torchrun's launcher included, and pages
shared between processes, such as torch's libraries, counted once per process). Rows go to
benchmarks/results/bench_catalog.json and bench_catalog-memory.json (`make results` renders them).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import h5py
import psutil
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from galaxy10 import synthetic
from galaxy10.dataset import CLASS_NAMES
from galaxy10.export import save_png
from galaxy10.models import Checkpoint, ModelRecord
from galaxy10.networks import DEFAULT_ARCH, CNNModel
from galaxy10.preprocessing import Preprocessing

import record
from bench_export import measure

ROOT = Path(__file__).resolve().parents[1]

SPEED_COLUMNS = [{"key": "images_per_s", "label": "images/s", "format": ".0f"},
                 {"key": "images_per_s_after_startup", "label": "after startup", "format": ".0f"},
                 {"key": "peak_mb", "label": "peak MB", "format": ",.0f"}]
MEMORY_COLUMNS = [{"key": "peak_mb", "label": "peak MB", "format": ",.0f"},
                  {"key": "peak_ratio", "label": "against the smallest", "format": ".2f"}]
PREDICT = [str(ROOT / "cnn_use_model.py")]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *PREDICT]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="catalog rows (default: 20000)")
    parser.add_argument("--images", type=int, default=500, help="distinct PNG files (default: 500)")
    parser.add_argument("--startup-rows", type=int, default=64,
                        help="rows of the catalog that times each mode's fixed cost (default: 64)")
    parser.add_argument("--memory", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                        help="instead: peak memory of one process on SMALL and LARGE rows (default: off)")
    parser.add_argument("--model-size", type=int, default=64, help="the model's image size (default: 64)")
    parser.add_argument("--png-size", type=int, default=256, help="side of the PNG files (default: 256)")
    return parser.parse_args(argv)


def export_pngs(folder: Path, count: int, size: int) -> list[str]:
    """`count` sample galaxies as PNG files in folder/png; their paths relative to `folder`."""
    h5 = folder / "sample.h5"
    synthetic.write_sample(h5, n=max(count, 20), seed=0, image_size=size, progress=False)
    (folder / "png").mkdir()
    with h5py.File(h5, "r") as file:
        for i in range(count):
            save_png(file["images"][i], folder / "png" / f"{i:05d}.png")
    h5.unlink()
    return [f"png/{i:05d}.png" for i in range(count)]


def write_catalog(path: Path, images: list[str], rows: int) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["objid", "path"])
        writer.writerows((row, images[row % len(images)]) for row in range(rows))
    return path


def write_model(path: Path, size: int) -> Path:
    torch.manual_seed(0)
    record = ModelRecord(DEFAULT_ARCH, CLASS_NAMES, Preprocessing(size))
    Checkpoint(record, CNNModel(image_size=size).state_dict()).save(path)
    return path


def run(mode: list[str], threads: int, catalog: Path, model: Path, out: Path) -> tuple[float, float]:
    """Seconds and peak MB of one catalog prediction."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the process tree that measure() starts
    out.unlink(missing_ok=True)
    return measure([sys.executable, *mode, str(catalog), "--model", str(model), "--out", str(out),
                    "--id-column", "objid"])


def compare_outputs(single: Path, merged: Path) -> dict[str, float | bool]:
    """The torchrun output against the one-process output: same rows in the same order, same classes."""
    a, b = pq.read_table(single), pq.read_table(merged)
    differences = [pc.max(pc.abs(pc.subtract(a[name], b[name]))).as_py() for name in CLASS_NAMES]
    return {
        "same_ids_in_order": a["objid"].equals(b["objid"]),
        "same_classes": a["class_id"].equals(b["class_id"]),
        "max_abs_probability_difference": max(differences),
    }


def speed(args: argparse.Namespace, folder: Path, model: Path, images: list[str]) -> dict:
    catalog = write_catalog(folder / "catalog.csv", images, args.rows)
    small = write_catalog(folder / "startup.csv", images, args.startup_rows)
    results: dict = {"rows": args.rows, "distinct_images": len(images), "cpus": psutil.cpu_count(),
                     "model_size": args.model_size, "png_size": args.png_size,
                     "load_average_before": os.getloadavg()}
    for name, mode, threads in (("one process, 2 threads", PREDICT, 2),
                                ("torchrun, 2 processes x 1 thread", TORCHRUN, 1)):
        print(f"{name}: {args.rows:,} rows ...", flush=True)
        out = folder / f"{threads}.parquet"
        startup_s, _ = run(mode, threads, small, model, folder / "startup.parquet")
        seconds, peak_mb = run(mode, threads, catalog, model, out)
        results[name] = {
            "seconds": seconds, "startup_seconds": startup_s, "peak_mb": peak_mb,
            "images_per_s": args.rows / seconds,
            "images_per_s_after_startup": (args.rows - args.startup_rows) / (seconds - startup_s),
        }
    results["torchrun_vs_one_process"] = compare_outputs(folder / "2.parquet", folder / "1.parquet")
    results["load_average_after"] = os.getloadavg()
    return results


def memory(args: argparse.Namespace, folder: Path, model: Path, images: list[str]) -> dict:
    results: dict = {"cpus": psutil.cpu_count(), "model_size": args.model_size, "png_size": args.png_size,
                     "load_average_before": os.getloadavg()}
    for rows in args.memory:
        print(f"one process, 2 threads: {rows:,} rows ...", flush=True)
        catalog = write_catalog(folder / f"{rows}.csv", images, rows)
        seconds, peak_mb = run(PREDICT, 2, catalog, model, folder / f"{rows}.parquet")
        results[f"{rows}_rows"] = {"seconds": seconds, "peak_mb": peak_mb, "images_per_s": rows / seconds}
    small, large = (results[f"{rows}_rows"]["peak_mb"] for rows in args.memory)
    results["peak_ratio"] = large / small
    results["load_average_after"] = os.getloadavg()
    return results


def report(results: dict) -> None:
    print(f"\n{psutil.cpu_count()} CPUs, load average {results['load_average_before'][0]:.1f} -> "
          f"{results['load_average_after'][0]:.1f} (other processes share the CPU); "
          f"{results['model_size']} px model, {results['png_size']} px PNGs")
    if "peak_ratio" in results:
        for key, value in results.items():
            if key.endswith("_rows"):
                print(f"{key.replace('_', ' '):>14}: peak {value['peak_mb']:.0f} MB, "
                      f"{value['images_per_s']:.0f} images/s")
        print(f"peak memory ratio {results['peak_ratio']:.3f} (bound: 1.2)")
        return
    print(f"{results['rows']:,} rows ({results['distinct_images']} distinct PNGs)")
    print(f"{'mode':<34}{'seconds':>9}{'images/s':>10}{'after startup':>15}{'peak MB':>9}")
    for name, value in results.items():
        if isinstance(value, dict) and "seconds" in value:
            print(f"{name:<34}{value['seconds']:>9.1f}{value['images_per_s']:>10.0f}"
                  f"{value['images_per_s_after_startup']:>15.0f}{value['peak_mb']:>9.0f}")
    check = results["torchrun_vs_one_process"]
    print(f"torchrun output against one process: ids in order {check['same_ids_in_order']}, classes "
          f"{check['same_classes']}, max |p difference| {check['max_abs_probability_difference']:.1e}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"exporting {args.images} sample galaxies at {args.png_size} px ...", flush=True)
        images = export_pngs(folder, args.images, args.png_size)
        model = write_model(folder / "random.pth", args.model_size)
        results = (memory if args.memory else speed)(args, folder, model, images)
    report(results)
    cmd = record.command(__file__, argv)
    if args.memory:
        rows = [record.row(f"{n} rows", cmd, results[f"{n}_rows"]) for n in args.memory]
        rows[-1]["metrics"]["peak_ratio"] = results["peak_ratio"]
        record.write("bench_catalog-memory", rows, title="Catalog prediction: peak memory against rows",
                     columns=MEMORY_COLUMNS, last_run=results)
    else:
        rows = [record.row(f"{name} ({args.rows} rows)", cmd, value) for name, value in results.items()
                if isinstance(value, dict) and "seconds" in value]
        record.write("bench_catalog", rows, title="Catalog prediction", columns=SPEED_COLUMNS,
                     last_run=results)


if __name__ == "__main__":
    main()
