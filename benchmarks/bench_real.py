"""Accuracy on real galaxies: networks, crops, augmentations and presets on the same data, 3 seeds each.

    python benchmarks/bench_real.py                      # the presets: real-cpu, and real-cpu --arch deepcnn5
    python benchmarks/bench_real.py --sweep crop         # resnet18 at crops 0.4, 0.5, 0.6, 0.75, 1
    python benchmarks/bench_real.py --sweep augment      # the original's, dihedral, rotation, none
    python benchmarks/bench_real.py --sweep arch         # every --arch on the same budget
    python benchmarks/bench_real.py --sweep precision    # the real-cpu preset in float32 and bfloat16
    python benchmarks/bench_real.py --sweep budget       # resnet18: more epochs or more pixels
    python benchmarks/bench_real.py --row "mine: --arch resnet50 --epochs 10" --seeds 0

Packs the 555 real Galaxy10 DECaLS images of ../shared/real_galaxy10 and ../shared/real_galaxy10_mini into
a Galaxy10-format HDF5 file, then runs the scripts as a user would: preprocess_and_balancing.py (the
seeded 80/20 split: 460 balanced training and 111 validation images) and, for every row and seed,
`cnn.py <row's flags> --seed S` with the evaluation report cnn.py writes beside each checkpoint. A row
is a name and cnn.py flags; the sweeps compare one setting at a time on a shared budget (SWEEP_BASE).
Prints, per row, accuracy and macro-F1 (mean +- std over the seeds), the accuracy with test-time
augmentation (the 8 flips and quarter turns), the training time (training and validation epochs, as
cnn.py measures them) and training images/s, with the command that reproduces the row. Results go to
benchmarks/results/bench_real-<sweep>.json (`make results` renders them into docs/results.md). Without
../shared it says so and exits 0.

Timings are only comparable with nothing else running: use 2 cores alone for the preset rows.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from galaxy10.dataset import META_FIELDS
from galaxy10.errors import run_cli
from galaxy10.models import output_path
from galaxy10.networks import ARCHITECTURES

import record

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared"
REAL_FOLDERS = ("real_galaxy10", "real_galaxy10_mini")
# The sweeps' shared budget: resnet18 at 64 px for 20 epochs (about 2 minutes on 2 cores), each row
# changing one thing.
BUDGET = "--image-size 64 --epochs 20 --patience 20 --lr 0.0033"
SWEEP_BASE = f"--arch resnet18 {BUDGET}"
SWEEPS: dict[str, list[str]] = {
    "presets": ["real-cpu: --preset real-cpu", "real-cpu deepcnn5: --preset real-cpu --arch deepcnn5"],
    "crop": [f"crop {crop}: {SWEEP_BASE} --crop {crop}" for crop in ("0.4", "0.5", "0.6", "0.75", "1")],
    "augment": [f"{mode}: {SWEEP_BASE} --augment {mode}"
                for mode in ("original", "dihedral", "rotation", "none")],
    "arch": [f"{arch}: --arch {arch} {BUDGET}" for arch in ARCHITECTURES],
    "precision": [f"real-cpu {p}: --preset real-cpu --precision {p}" for p in ("fp32", "bf16")],
    # The real-cpu preset's candidates: resnet18 with the default recipe, more epochs or more pixels.
    "budget": [f"{size} px {epochs} epochs: --arch resnet18 --image-size {size} --epochs {epochs} "
               f"--patience {epochs} --lr 0.0033" for size, epochs in ((64, 100), (64, 200), (96, 100))],
}
TITLES = {"presets": "Presets", "crop": "Crops (resnet18, 20 epochs)",
          "augment": "Augmentations (resnet18, 20 epochs)", "arch": "Networks (20 epochs)",
          "precision": "Precision: the real-cpu preset in float32 and bfloat16",
          "budget": "Budget: more epochs or more pixels (resnet18)", "rows": "Rows run one by one"}
COLUMNS = [
    {"key": "accuracy", "label": "accuracy", "format": ".1%"},
    {"key": "macro_f1", "label": "macro-F1", "format": ".3f"},
    {"key": "tta_accuracy", "label": "TTA", "format": ".1%"},
    {"key": "train_s", "label": "training s", "format": ".0f"},
    {"key": "images_per_s", "label": "images/s", "format": ".0f"},
    {"key": "cnn", "label": "trains, per seed S", "format": "code"},
]


def real_images_here() -> bool:
    """Whether ../shared holds the real images; where not, one line says so (the benchmark then exits 0)."""
    if all((SHARED / name / "labels.csv").is_file() for name in REAL_FOLDERS):
        return True
    print(f"skipped: the real images are not here (expected {SHARED}/{{{','.join(REAL_FOLDERS)}}})")
    return False


def real_images() -> list[tuple[Path, int]]:
    """(image, class id) for every labelled real image in ../shared."""
    rows = []
    for name in REAL_FOLDERS:
        folder = SHARED / name
        with (folder / "labels.csv").open(newline="") as f:
            rows += [(folder / "images" / row["file"], int(row["label"])) for row in csv.DictReader(f)]
    return rows


def pack_galaxy10(rows: list[tuple[Path, int]], path: Path) -> None:
    """Write the images in the official file's layout; the real metadata is not shipped, so it is NaN."""
    images = np.stack([np.asarray(Image.open(image).convert("RGB")) for image, _ in rows])
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["ans"] = np.array([label for _, label in rows], dtype=np.uint8)
        for name in META_FIELDS:
            f[name] = np.full(len(rows), np.nan)


def run_script(*args: str) -> None:
    """Run one of the project's scripts as a user would; its output is not shown."""
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def parse_row(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition(":")
    return name.strip(), flags.split()


def train_and_evaluate(data: Path, name: str, flags: list[str], seed: int, folder: Path) -> dict:
    """One row's run for one seed: cnn.py on the balanced real split, then its evaluation report."""
    model_path = folder / f"{name.replace(' ', '-')}-seed{seed}.pth"
    run_script(str(ROOT / "cnn.py"), *flags, "--seed", str(seed), "--train-dir", str(data / "train"),
               "--val-dir", str(data / "val"), "--model-path", str(model_path))
    report = json.loads(output_path(model_path, "report.json").read_text())
    history = json.loads(output_path(model_path, "history.json").read_text())
    return {"row": name, "seed": seed, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
            "tta_accuracy": report["tta"]["accuracy"], "tta_macro_f1": report["tta"]["macro_f1"],
            "best_epoch": report["epoch"], "epochs_trained": len(history["val_loss"]),
            "train_s": report["train_seconds"], "images_per_s": report["train_images_per_s"]}


def mean_std(values: list[float], spec: str) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{spec}} +- {spread:{spec}}"


def summary(runs: list[dict], rows: list[tuple[str, list[str]]]) -> list[dict]:
    """Per row: mean +- std over the seeds, and the command that reproduces one seed."""
    table = []
    for name, flags in rows:
        mine = [r for r in runs if r["row"] == name]
        table.append({
            "row": name,
            "accuracy": mean_std([r["accuracy"] for r in mine], ".1%"),
            "macro_f1": mean_std([r["macro_f1"] for r in mine], ".3f"),
            "tta_accuracy": mean_std([r["tta_accuracy"] for r in mine], ".1%"),
            "train_s": mean_std([r["train_s"] for r in mine], ".0f"),
            "images_per_s": mean_std([r["images_per_s"] for r in mine], ".0f"),
            "seeds": " ".join(str(r["seed"]) for r in mine),
            "command": "python cnn.py " + " ".join(flags),
        })
    return table


def result_rows(runs: list[dict], rows: list[tuple[str, list[str]]], cmd: str) -> list[dict]:
    """Per row, in benchmarks/record.py's format: each metric's mean, std and per-seed values."""
    result = []
    for name, flags in rows:
        mine = [r for r in runs if r["row"] == name]
        metrics = {key: record.mean_std([r[key] for r in mine])
                   for key in ("accuracy", "macro_f1", "tta_accuracy", "train_s", "images_per_s")}
        metrics["seeds"] = [r["seed"] for r in mine]
        cnn = "python cnn.py " + " ".join([*flags, "--seed", "S"])
        result.append(record.row(name, cmd, metrics, cnn=cnn))
    return result


def print_table(table: list[dict]) -> None:
    header = ("row", "accuracy", "macro_f1", "tta_accuracy", "train_s", "images_per_s")
    widths = [max(len(h), *(len(row[h]) for row in table)) for h in header]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in table:
        print("  ".join(row[h].ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in table:
        print(f"{row['row']}: {row['command']} --seed S  (seeds {row['seeds']})")


def row_parser(description: str, sweeps: Sequence[str], flags_help: str) -> argparse.ArgumentParser:
    """The flags every real-galaxy benchmark takes: a sweep, or rows of cnn.py flags, and the seeds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sweep", choices=list(sweeps), default="presets",
                        help="which rows to run (default: presets)")
    parser.add_argument("--row", action="append", default=[], metavar="'NAME: FLAGS'",
                        help=f"run this row ({flags_help}) instead of a sweep; may be repeated")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds (default: 0 1 2)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = row_parser(__doc__.split("\n\n")[0], SWEEPS, "cnn.py flags")
    parser.add_argument("--split-seed", type=int, default=42,
                        help="seed of preprocess_and_balancing.py's split (default: 42, its own default)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not real_images_here():
        return
    rows = [parse_row(text) for text in (args.row or SWEEPS[args.sweep])]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_real-") as tmp:
        folder = Path(tmp)
        images = real_images()
        pack_galaxy10(images, folder / "real.h5")
        run_script(str(ROOT / "preprocess_and_balancing.py"), "--h5", str(folder / "real.h5"),
                   "--out", str(folder / "balanced"), "--seed", str(args.split_seed))
        for seed in args.seeds:
            for name, flags in rows:
                runs.append(train_and_evaluate(folder / "balanced", name, flags, seed, folder))
                print(json.dumps(runs[-1]), flush=True)
    table = summary(runs, rows)
    print(f"\n{len(images)} real images, split 80/20 (seed {args.split_seed}); seeds {args.seeds}\n")
    print_table(table)
    name = "rows" if args.row else args.sweep
    record.write(f"bench_real-{name}", result_rows(runs, rows, record.command(__file__, argv)),
                 title=TITLES[name], columns=COLUMNS, section="real",
                 last_run={"split_seed": args.split_seed, "runs": runs})


if __name__ == "__main__":
    sys.exit(run_cli(main))
