"""Fine-tuning onto your own labels: a Galaxy10 model fine-tuned onto coarse classes, against from scratch.

    python benchmarks/bench_finetune.py                 # 5 seeds (~35 min on 2 cores)
    python benchmarks/bench_finetune.py --seeds 0 --epochs 5 --results /tmp/r   # a smoke run

The situation it measures: an astronomer with a few hundred galaxies labelled in their own, coarser
scheme, and a Galaxy10 model trained on other galaxies. For each seed S the 555 real Galaxy10 DECaLS images
of ../shared (bench_real.py packs them) are split, stratified and seeded by S, into three disjoint parts:

- 50% with their Galaxy10 labels, on which `cnn.py --preset real-cpu --seed S` trains the Galaxy10 model;
- 30% relabelled coarse (smooth: classes 2, 3, 4; disk: 5-9; disturbed or merging: 0, 1), exported and
  balanced by preprocess_and_balancing.py, the astronomer's own labelled set;
- 20% relabelled coarse, held out: every row's accuracy and macro-F1 are measured on it
  (`cnn.py --evaluate`).

Rows, all with the real-cpu preset's network, size and budget on the same coarse set:
from scratch; fine-tuned (`--init-from` the Galaxy10 model: its network kept, a new output layer), at
the preset's learning rate and at a third of it; a linear probe (`--init-from ... --freeze-body`); and,
with no coarse training at all, the Galaxy10 model's own probabilities summed over each coarse class's
Galaxy10 classes. Each is mean +- std over the
seeds, and the fine-tuned rows also as the paired gain over scratch on the same split.

Results go to benchmarks/results/bench_finetune.json (`make results` renders them into docs/results.md).
All data lives in a temporary folder. Without ../shared it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from galaxy10.errors import run_cli

import record
from bench_real import pack_galaxy10, real_images, real_images_here, run_script

ROOT = Path(__file__).resolve().parents[1]

# The coarse label set: its names, in label order, and the Galaxy10 classes each one gathers.
COARSE = {"disturbed or merging": (0, 1), "smooth": (2, 3, 4), "disk": (5, 6, 7, 8, 9)}
TO_COARSE = {g10: coarse for coarse, members in enumerate(COARSE.values()) for g10 in members}
SHARES = {"galaxy10": 0.5, "own": 0.3, "test": 0.2}
PRESET = ["--preset", "real-cpu"]
ROWS = {  # name -> cnn.py flags on the coarse set, beside the preset's; {g10} is the Galaxy10 model
    "from scratch": [],
    "fine-tuned (--init-from)": ["--init-from", "{g10}"],
    "fine-tuned, a third of the learning rate": ["--init-from", "{g10}", "--lr", "0.0011"],
    "linear probe (--init-from --freeze-body)": ["--init-from", "{g10}", "--freeze-body"],
}
SUMMED = "Galaxy10 model, probabilities summed per coarse class (no coarse training)"
COLUMNS = [
    {"key": "accuracy", "label": "accuracy", "format": ".1%"},
    {"key": "macro_f1", "label": "macro-F1", "format": ".3f"},
    {"key": "gain", "label": "gain over scratch (paired)", "format": "+.1%"},
    {"key": "train_s", "label": "training s", "format": ".0f"},
    {"key": "cnn", "label": "trains, per seed S", "format": "code"},
]


def split(rows: list[tuple[Path, int]], seed: int) -> dict[str, list[tuple[Path, int]]]:
    """The three disjoint parts of SHARES, each stratified by Galaxy10 class."""
    from sklearn.model_selection import train_test_split

    labels = [label for _, label in rows]
    galaxy10, rest = train_test_split(rows, train_size=SHARES["galaxy10"], stratify=labels, random_state=seed)
    own_share = SHARES["own"] / (SHARES["own"] + SHARES["test"])
    own, test = train_test_split(rest, train_size=own_share, stratify=[label for _, label in rest],
                                 random_state=seed)
    return {"galaxy10": galaxy10, "own": own, "test": test}


def coarse(rows: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
    return [(path, TO_COARSE[label]) for path, label in rows]


def class_folders(rows: list[tuple[Path, int]], folder: Path) -> Path:
    """rows as folder/<label>/<image> links: a folder cnn.py --evaluate reads."""
    for path, label in rows:
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / path.name).symlink_to(path)
    return folder


def train(data: Path, flags: list[str], model_path: Path, names: Path | None) -> float:
    """cnn.py on an exported, balanced folder; the training seconds its report gives."""
    from galaxy10.models import output_path

    extra = ["--class-names", str(names)] if names else []
    run_script(str(ROOT / "cnn.py"), *flags, *extra, "--train-dir", str(data / "train"),
               "--val-dir", str(data / "val"), "--model-path", str(model_path))
    return json.loads(output_path(model_path, "report.json").read_text())["train_seconds"]


def evaluate(model_path: Path, test: Path, names: Path) -> dict:
    """cnn.py --evaluate on the held-out coarse folder: its accuracy and macro-F1."""
    from galaxy10.models import output_path

    run_script(str(ROOT / "cnn.py"), "--evaluate", "--model-path", str(model_path), "--val-dir", str(test),
               "--class-names", str(names))
    report = json.loads(output_path(model_path, "report.json").read_text())
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}


def summed(model_path: Path, test: list[tuple[Path, int]]) -> dict:
    """The Galaxy10 model's probabilities summed over each coarse class's members, on the coarse test set."""
    from sklearn.metrics import f1_score

    from galaxy10.inference import predict_batch

    predictions = predict_batch([path for path, _ in test], model_path, exact=True, device="cpu")
    members = [list(group) for group in COARSE.values()]
    chosen = [int(np.argmax([sum(p.probabilities[i] for i in group) for group in members]))
              for p in predictions]
    truth = [label for _, label in test]
    return {"accuracy": float(np.mean(np.array(chosen) == np.array(truth))),
            "macro_f1": float(f1_score(truth, chosen, average="macro"))}


def run_seed(seed: int, rows: list[tuple[Path, int]], folder: Path, epochs: list[str]) -> list[dict]:
    """Every row for one seed: one split, one Galaxy10 model, one coarse set, one held-out test set."""
    folder.mkdir()
    parts = split(rows, seed)
    names = folder / "coarse-names.txt"
    names.write_text("\n".join(COARSE) + "\n")
    seeded = [*PRESET, *epochs, "--seed", str(seed)]

    pack_galaxy10(parts["galaxy10"], folder / "galaxy10.h5")
    pack_galaxy10(coarse(parts["own"]), folder / "own.h5")
    for name in ("galaxy10", "own"):
        run_script(str(ROOT / "preprocess_and_balancing.py"), "--h5", str(folder / f"{name}.h5"),
                   "--out", str(folder / name), "--seed", str(seed))
    test_rows = coarse(parts["test"])
    test = class_folders(test_rows, folder / "test")
    g10 = folder / "galaxy10.pth"
    g10_seconds = train(folder / "galaxy10", seeded, g10, None)

    sizes = {name: len(part) for name, part in parts.items()}
    results = [{"row": SUMMED, "seed": seed, **summed(g10, test_rows), "train_s": g10_seconds, **sizes}]
    for name, flags in ROWS.items():
        model_path = folder / f"row{len(results)}.pth"
        started = time.perf_counter()
        seconds = train(folder / "own", [*seeded, *(f.format(g10=g10) for f in flags)], model_path, names)
        results.append({"row": name, "seed": seed, **evaluate(model_path, test, names), "train_s": seconds,
                        "wall_s": time.perf_counter() - started, **sizes})
    return results


def result_rows(runs: list[dict], cmd: str, epochs: list[str]) -> list[dict]:
    """Per row: accuracy, macro-F1 and training time over the seeds, and the paired gain over scratch."""
    scratch = {r["seed"]: r["accuracy"] for r in runs if r["row"] == "from scratch"}
    preset = " ".join([*PRESET, *epochs])
    rows = []
    for name in (*ROWS, SUMMED):
        mine = [r for r in runs if r["row"] == name]
        metrics = {key: record.mean_std([r[key] for r in mine])
                   for key in ("accuracy", "macro_f1", "train_s")}
        if name != "from scratch":
            metrics["gain"] = record.mean_std([r["accuracy"] - scratch[r["seed"]] for r in mine])
        metrics["seeds"] = [r["seed"] for r in mine]
        if name == SUMMED:
            cnn = f"python cnn.py {preset} --seed S  (on the Galaxy10 half; training s is this model's)"
        else:
            flags = " ".join(f.format(g10="galaxy10.pth") for f in ROWS[name])
            cnn = f"python cnn.py {preset} {flags} --class-names coarse.txt --seed S".replace("  ", " ")
        rows.append(record.row(name, cmd, metrics, cnn=cnn, highlight=name == "fine-tuned (--init-from)"))
    return rows


def print_summary(runs: list[dict]) -> None:
    scratch = {r["seed"]: r["accuracy"] for r in runs if r["row"] == "from scratch"}
    for name in (*ROWS, SUMMED):
        mine = [r for r in runs if r["row"] == name]
        acc = record.mean_std([r["accuracy"] for r in mine])
        line = f"{name}: accuracy {acc['mean']:.1%} +- {acc['std']:.1%}"
        if name != "from scratch":
            gain = record.mean_std([r["accuracy"] - scratch[r["seed"]] for r in mine])
            line += f", gain over scratch {gain['mean']:+.1%} +- {gain['std']:.1%}"
        print(line)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="seeds of the split and of every training run (default: 0 1 2 3 4)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="train every model this many epochs (--epochs N --patience N) instead of the "
                             "preset's 100")
    parser.add_argument("--results", type=Path, default=None,
                        help="the folder to write bench_finetune.json to (default: benchmarks/results)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not real_images_here():
        return
    epochs = [] if args.epochs is None else ["--epochs", str(args.epochs), "--patience", str(args.epochs)]
    rows = real_images()
    runs: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_finetune-") as tmp:
        for seed in args.seeds:
            for result in run_seed(seed, rows, Path(tmp) / f"seed{seed}", epochs):
                runs.append(result)
                print(json.dumps(result), flush=True)
    wall = time.perf_counter() - started
    print()
    print_summary(runs)
    print(f"\n{len(rows)} real galaxies, seeds {args.seeds}; {wall:.0f} s in all")
    record.write("bench_finetune", result_rows(runs, record.command(__file__, argv), epochs),
                 title="Fine-tuning onto coarse labels", columns=COLUMNS, section="finetune",
                 last_run={"runs": runs, "wall_s": wall, "coarse": {k: list(v) for k, v in COARSE.items()},
                           "shares": SHARES},
                 **({"folder": args.results} if args.results else {}))


if __name__ == "__main__":
    sys.exit(run_cli(main))
