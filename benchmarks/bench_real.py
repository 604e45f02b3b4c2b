"""Does the recipe learn real galaxies? The default recipe against --recipe original, on real images.

    python benchmarks/bench_real.py                  # 3 seeds of each recipe, about 40 minutes on 2 cores
    python benchmarks/bench_real.py --seeds 0        # one seed each
    python benchmarks/bench_real.py --no-pretrain    # from scratch on the real images

Packs the 555 real Galaxy10 DECaLS images of ../shared/real_galaxy10 and ../shared/real_galaxy10_mini
into a Galaxy10-format HDF5 file, then runs the scripts in order as a user would:
preprocess_and_balancing.py (the seeded 80/20 split, balanced train), cnn.py --preset cpu for each
recipe and seed, and the evaluation report cnn.py writes beside each checkpoint. By default each
recipe first trains `make demo`'s model on the built-in sample (2,000 synthetic galaxies) and every
seed starts from it (--init-from): 460 real training images are too few for the network to leave
chance level within minutes from random weights. Prints val accuracy and macro-F1, mean +- std over
the seeds, for each recipe, with each seed's training time. Figures go to stdout and
benchmarks/results/bench_real.json. Without ../shared it says so and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnn import RECIPES  # noqa: E402
from galaxy10 import META_FIELDS, run_cli  # noqa: E402
from models import output_path  # noqa: E402

SHARED = ROOT.parent / "shared"
REAL_FOLDERS = ("real_galaxy10", "real_galaxy10_mini")
RESULTS = ROOT / "benchmarks" / "results" / "bench_real.json"
# 555 images leave 46 training images a class: 18 epochs fit in the 5 minutes the sample's 4 take (about
# 15 s an epoch on 2 cores), and val loss on 111 images is noisy, so early stopping gets more patience.
TRAIN_FLAGS = ("--preset", "cpu", "--epochs", "18", "--patience", "10")
SAMPLE_N = 2000  # make demo's sample


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


def run_script(*args: str) -> float:
    """Run one of the project's scripts as a user would; returns its wall-clock seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def balanced_sample(folder: Path) -> Path:
    """The demo's data: the built-in sample as `make demo` makes it, exported and balanced."""
    run_script(str(ROOT / "sample_data.py"), "--out", str(folder / "sample.h5"), "--n", str(SAMPLE_N))
    run_script(str(ROOT / "preprocess_and_balancing.py"), "--h5", str(folder / "sample.h5"),
               "--out", str(folder / "sample"))
    return folder / "sample"


def pretrain(sample: Path, recipe: str, folder: Path) -> tuple[Path, float]:
    """`make demo`'s model for a recipe (`cnn.py --preset cpu` on the sample) and its training time."""
    model_path = folder / f"{recipe}-sample.pth"
    seconds = run_script(str(ROOT / "cnn.py"), "--preset", "cpu", "--recipe", recipe,
                         "--train-dir", str(sample / "train"), "--val-dir", str(sample / "val"),
                         "--model-path", str(model_path))
    return model_path, seconds


def train_and_evaluate(data: Path, recipe: str, seed: int, folder: Path, extra: Sequence[str]) -> dict:
    model_path = folder / f"{recipe}-seed{seed}.pth"
    seconds = run_script(str(ROOT / "cnn.py"), *TRAIN_FLAGS, *extra, "--recipe", recipe, "--seed", str(seed),
                         "--train-dir", str(data / "train"), "--val-dir", str(data / "val"),
                         "--model-path", str(model_path))
    report = json.loads(output_path(model_path, "report.json").read_text())
    history = json.loads(output_path(model_path, "history.json").read_text())
    return {"recipe": recipe, "seed": seed, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
            "best_epoch": report["epoch"], "epochs_trained": len(history["val_loss"]), "train_s": seconds}


def mean_std(values: list[float], spec: str) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{spec}} +- {spread:{spec}}"


def summary(runs: list[dict], recipes: Sequence[str]) -> list[tuple[str, str]]:
    rows = []
    for recipe in recipes:
        mine = [r for r in runs if r["recipe"] == recipe]
        rows += [
            (f"{recipe}: val accuracy", mean_std([r["accuracy"] for r in mine], ".1%")),
            (f"{recipe}: val macro-F1", mean_std([r["macro_f1"] for r in mine], ".3f")),
            (f"{recipe}: training s / seed", ", ".join(f"{r['train_s']:.0f}" for r in mine)),
        ]
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds (default: 0 1 2)")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                        help=f"recipes to compare (default: {' '.join(RECIPES)})")
    parser.add_argument("--split-seed", type=int, default=42,
                        help="seed of preprocess_and_balancing.py's split (default: 42, its own default)")
    parser.add_argument("--no-pretrain", dest="pretrain", action="store_false",
                        help="train on the real images from scratch instead of starting from each recipe's "
                             "demo model (cnn.py --preset cpu on the built-in sample)")
    parser.add_argument("cnn_flags", nargs=argparse.REMAINDER,
                        help=f"after --, more cnn.py flags (it already gets {' '.join(TRAIN_FLAGS)})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not all((SHARED / name / "labels.csv").is_file() for name in REAL_FOLDERS):
        print(f"skipped: the real images are not here (expected {SHARED}/{{{','.join(REAL_FOLDERS)}}})")
        return
    extra = [flag for flag in args.cnn_flags if flag != "--"]
    with tempfile.TemporaryDirectory(prefix="bench_real-") as tmp:
        folder = Path(tmp)
        rows = real_images()
        pack_galaxy10(rows, folder / "real.h5")
        run_script(str(ROOT / "preprocess_and_balancing.py"), "--h5", str(folder / "real.h5"),
                   "--out", str(folder / "balanced"), "--seed", str(args.split_seed))
        start_from: dict[str, list[str]] = {recipe: [] for recipe in args.recipes}
        pretrain_s = {}
        if args.pretrain:
            sample = balanced_sample(folder)
            for recipe in args.recipes:
                model_path, pretrain_s[recipe] = pretrain(sample, recipe, folder)
                start_from[recipe] = ["--init-from", str(model_path)]
                report = json.loads(output_path(model_path, "report.json").read_text())
                print(json.dumps({"pretrained": recipe, "train_s": pretrain_s[recipe],
                                  "sample_val_accuracy": report["accuracy"]}), flush=True)
        runs = []
        for seed in args.seeds:
            for recipe in args.recipes:
                runs.append(train_and_evaluate(folder / "balanced", recipe, seed, folder,
                                               [*start_from[recipe], *extra]))
                print(json.dumps(runs[-1]), flush=True)
    rows_out = [("images", f"{len(rows)} real, split 80/20 (seed {args.split_seed})"),
                ("cnn.py flags", " ".join([*TRAIN_FLAGS, *extra])),
                ("pre-trained on", f"the built-in sample ({SAMPLE_N} images), training s: "
                 + ", ".join(f"{r} {s:.0f}" for r, s in pretrain_s.items()) if args.pretrain else "nothing"),
                ("seeds", " ".join(map(str, args.seeds))), *summary(runs, args.recipes)]
    print()
    for name, value in rows_out:
        print(f"{name:<30}{value:>50}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"runs": runs, "flags": [*TRAIN_FLAGS, *extra], "pretrain_s": pretrain_s},
                                  indent=2) + "\n")
    print(f"\nresults written to {RESULTS}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
