"""Accuracy on real galaxies by cross-validation: every row is `cnn.py --folds K` on all 555 real galaxies of
../shared, so every galaxy is answered by a member that never saw it (the out-of-fold figures the README
gives), with the committee's training time beside them.

    python benchmarks/bench_folds.py                          # the real-cpu preset, seeds 0 1 2
    python benchmarks/bench_folds.py --sweep recipe --seeds 0  # the recipe's candidates, one seed
    python benchmarks/bench_folds.py --row "mine: --preset real-cpu --mixup 0.4" --seeds 0

Packs the images into a Galaxy10-format file, exports it with preprocess_and_balancing.py (the seeded split
into train/ and val/, the training classes balanced with augmented copies, which --folds keeps with their
originals and never scores), and runs each row's `cnn.py <flags> --folds K --seed S` on both folders
together. Per row: out-of-fold accuracy, macro-F1, ECE after calibration (and the ECE a perfectly calibrated
model would show on as many galaxies by chance), of the answers the committee gives by default (with the 8
flips and quarter turns averaged where it was trained --serve-tta); the accuracy without and with them; and
the minutes of training the committee took (its members' epochs, as cnn.py measures them), mean +- std over
the seeds. Results go to benchmarks/results/bench_folds-<sweep>.json (`make results`). Without ../shared it
says so and exits 0. Timings are only comparable with nothing else running on the machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from galaxy10.errors import run_cli
from galaxy10.models import output_path

import record
from bench_real import pack_galaxy10, parse_row, real_images, real_images_here, row_parser, run_script

ROOT = Path(__file__).resolve().parents[1]
BASE = "--arch resnet18 --image-size 64 --epochs 28 --patience 28 --lr 0.0033"
SWEEPS: dict[str, list[str]] = {
    "presets": ["real-cpu: --preset real-cpu"],
    # the candidates for real-cpu, each one change from a 5-member resnet18 committee of 28 epochs a member
    # (the preset trains 25, to fit 15 minutes); d4 base is the D4-equivariant network on the same epochs
    "recipe": [f"r18 base: {BASE}",
               f"d4 base: {BASE.replace('resnet18', 'd4resnet18')}",
               f"r18 mixup 0.2: {BASE} --mixup 0.2",
               f"r18 ema 0.99: {BASE} --ema 0.99",
               f"r18 lr x2: {BASE.replace('0.0033', '0.0066')}",
               "r18 96 px 12 epochs: --arch resnet18 --image-size 96 --epochs 12 --patience 12 --lr 0.0033",
               f"r18 cutmix 1: {BASE} --cutmix 1.0"],
}
TITLES = {"presets": "Presets, by cross-validation", "recipe": "The real-cpu recipe's candidates, by "
          "cross-validation", "rows": "Rows run one by one, by cross-validation"}
COLUMNS = [
    {"key": "accuracy", "label": "out-of-fold accuracy", "format": ".1%"},
    {"key": "macro_f1", "label": "macro-F1", "format": ".3f"},
    {"key": "ece", "label": "ECE", "format": ".3f"},
    {"key": "ece_floor", "label": "ECE by chance", "format": ".3f"},
    {"key": "plain_accuracy", "label": "without TTA", "format": ".1%"},
    {"key": "tta_accuracy", "label": "with TTA", "format": ".1%"},
    {"key": "train_minutes", "label": "training minutes", "format": ".1f"},
    {"key": "cnn", "label": "trains, per seed S", "format": "code"},
]
METRICS = ("accuracy", "macro_f1", "ece", "ece_floor", "plain_accuracy", "tta_accuracy", "train_minutes")


def train_committee(data: Path, name: str, flags: list[str], seed: int, folder: Path) -> dict:
    """One row's committee for one seed, and what its out-of-fold report says."""
    model_path = folder / f"{name.replace(' ', '-')}-seed{seed}.pth"
    run_script(str(ROOT / "cnn.py"), *flags, "--seed", str(seed), "--train-dir", str(data / "train"),
               "--val-dir", str(data / "val"), "--model-path", str(model_path))
    report = json.loads(output_path(model_path, "report.json").read_text())
    return {"row": name, "seed": seed, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
            "ece": report["ece"], "ece_floor": report["ece_by_chance"],
            "plain_accuracy": report["without_tta"]["accuracy"], "tta_accuracy": report["tta"]["accuracy"],
            "train_minutes": report["train_seconds"] / 60, "folds": report.get("folds", 1),
            "n": report["n_samples"]}


def result_rows(runs: list[dict], rows: list[tuple[str, list[str]]], cmd: str) -> list[dict]:
    table = []
    for name, flags in rows:
        mine = [r for r in runs if r["row"] == name]
        metrics = {key: record.mean_std([r[key] for r in mine]) for key in METRICS}
        metrics["seeds"] = [r["seed"] for r in mine]
        table.append(record.row(name, cmd, metrics, cnn="python cnn.py " + " ".join([*flags, "--seed", "S"])))
    return table


def print_table(runs: list[dict], rows: list[tuple[str, list[str]]]) -> None:
    for name, flags in rows:
        mine = [r for r in runs if r["row"] == name]
        cells = []
        for key in METRICS:
            values = [r[key] for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{key} {statistics.mean(values):.3f} +- {spread:.3f}")
        print(f"{name}: {', '.join(cells)}  (python cnn.py {' '.join(flags)} --seed S)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = row_parser(__doc__.split("\n\n")[0], SWEEPS, "cnn.py flags; --folds 5 unless they say")
    parser.add_argument("--name", default=None, help="the result file's name for --row runs "
                                                     "(default: rows): bench_folds-NAME.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not real_images_here():
        return
    rows = [parse_row(text) for text in (args.row or SWEEPS[args.sweep])]
    rows = [(name, flags if "--folds" in flags or "--preset" in flags else [*flags, "--folds", "5"])
            for name, flags in rows]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_folds-") as tmp:
        folder = Path(tmp)
        pack_galaxy10(real_images(), folder / "real.h5")
        run_script(str(ROOT / "preprocess_and_balancing.py"), "--h5", str(folder / "real.h5"),
                   "--out", str(folder / "balanced"))
        for seed in args.seeds:
            for name, flags in rows:
                runs.append(train_committee(folder / "balanced", name, flags, seed, folder))
                print(json.dumps(runs[-1]), flush=True)
    print_table(runs, rows)
    stem = f"rows-{args.name}" if args.row and args.name else ("rows" if args.row else args.sweep)
    record.write(f"bench_folds-{stem}", result_rows(runs, rows, record.command(__file__, argv)),
                 title=TITLES.get(stem, f"{stem}, by cross-validation"), columns=COLUMNS, section="cv",
                 last_run={"runs": runs})


if __name__ == "__main__":
    sys.exit(run_cli(main))
