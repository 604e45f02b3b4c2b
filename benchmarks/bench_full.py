"""Full scale: `cnn.py --preset full` on the whole Galaxy10 DECaLS file, on a GPU.

    python benchmarks/bench_full.py --h5 Galaxy10_DECals.h5            # seed 0
    python benchmarks/bench_full.py --h5 Galaxy10_DECals.h5 --seeds 0 1 2

Exports the file with preprocess_and_balancing.py (the seeded, stratified 80/20 split; the training
classes balanced with augmented copies), trains `cnn.py --preset full --seed S` on it, and records the
accuracy, macro-F1 and ECE on the held-out 20% (3,548 galaxies: the evaluation report cnn.py writes, which
the best epoch was chosen on too), the accuracy with the 8 flips and quarter turns averaged, the minutes of
training and the training images per second. Results go to benchmarks/results/bench_full.json
(`make results`). Without the file, or without a GPU (the full preset would take days on a CPU), it says so
and exits 0; `--allow-cpu` runs it anyway.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from galaxy10.dataset import DEFAULT_H5
from galaxy10.errors import run_cli
from galaxy10.models import output_path

import record
from bench_real import run_script

ROOT = Path(__file__).resolve().parents[1]
TITLE = "Full scale: `--preset full` on Galaxy10_DECals.h5"
COLUMNS = [
    {"key": "accuracy", "label": "held-out accuracy", "format": ".1%"},
    {"key": "macro_f1", "label": "macro-F1", "format": ".3f"},
    {"key": "ece", "label": "ECE", "format": ".3f"},
    {"key": "tta_accuracy", "label": "with TTA", "format": ".1%"},
    {"key": "train_minutes", "label": "training minutes", "format": ".0f"},
    {"key": "images_per_s", "label": "training images/s", "format": ".0f"},
]
METRICS = ("accuracy", "macro_f1", "ece", "tta_accuracy", "train_minutes", "images_per_s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--h5", type=Path, default=Path(DEFAULT_H5), help=f"the file (default: {DEFAULT_H5})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (default: skip)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the export and the checkpoints (default: a temporary one)")
    return parser.parse_args(argv)


def gpu_here() -> bool:
    import torch

    return torch.cuda.is_available()


def train(data: Path, seed: int, folder: Path) -> dict:
    model_path = folder / f"full-seed{seed}.pth"
    run_script(str(ROOT / "cnn.py"), "--preset", "full", "--seed", str(seed), "--train-dir",
               str(data / "train"), "--val-dir", str(data / "val"), "--model-path", str(model_path))
    report = json.loads(output_path(model_path, "report.json").read_text())
    return {"seed": seed, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
            "ece": report["ece"], "tta_accuracy": report["tta"]["accuracy"],
            "train_minutes": report["train_seconds"] / 60, "images_per_s": report["train_images_per_s"],
            "n": report["n_samples"]}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.h5.is_file():
        print(f"skipped: {args.h5} is not here (python load_data.py --download fetches it)")
        return
    if not gpu_here() and not args.allow_cpu:
        print("skipped: no GPU here, and the full preset would take days on a CPU (--allow-cpu runs it)")
        return
    with tempfile.TemporaryDirectory(prefix="bench_full-") as tmp:
        folder = args.work or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        run_script(str(ROOT / "preprocess_and_balancing.py"), "--h5", str(args.h5), "--out",
                   str(folder / "balanced"), "--force")
        runs = []
        for seed in args.seeds:
            runs.append(train(folder / "balanced", seed, folder))
            print(json.dumps(runs[-1]), flush=True)
    metrics = {key: record.mean_std([r[key] for r in runs]) for key in METRICS}
    metrics["seeds"] = [r["seed"] for r in runs]
    row = record.row("--preset full", record.command(__file__, argv), metrics,
                     cnn="python cnn.py --preset full --seed S")
    record.write("bench_full", [row], title=TITLE, columns=COLUMNS, section="full", last_run={"runs": runs})


if __name__ == "__main__":
    sys.exit(run_cli(main))
