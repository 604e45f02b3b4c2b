"""Inference: classify galaxy images with a checkpoint written by cnn.py (or the original project): one
image, folders, a Galaxy10 .h5 file, or a catalog (a CSV or Parquet table of image paths).

    python cnn_use_model.py galaxy.jpg                       # the original: one image, one class name
    python cnn_use_model.py images/ --out predictions.csv    # every image under a folder
    python cnn_use_model.py Galaxy10_DECals.h5 --tta         # every row, with accuracy where `ans` exists
    python cnn_use_model.py catalog.parquet --id-column objid --out predictions.parquet --resume
    torchrun --standalone --nproc_per_node 4 cnn_use_model.py catalog.csv --out predictions.parquet

From Python, `main(img_path, model_path)` returns the class name as the original did, and `predict` returns
the whole `Prediction`; `predict_batch`, `features`, `grad_cam` and `load_model` are here too. This script is
the command line; the work is the galaxy10 package's: the prepared model and the predictions in
galaxy10/inference.py, what a prediction says in galaxy10/prediction.py, the run over the inputs in
galaxy10/classify.py, output files in galaxy10/catalog.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from galaxy10 import trust
from galaxy10.catalog import BARRIER_TIMEOUT, DEFAULT_CHUNK_ROWS, plan_output
from galaxy10.classify import classify_inputs, output_file
from galaxy10.distributed import DEVICES, torchrun_group
from galaxy10.errors import run_cli
from galaxy10.images import ImageError, Source
from galaxy10.inference import features, grad_cam, iter_predictions, load_model, predict, predict_batch
from galaxy10.models import DEFAULT_CHECKPOINT
from galaxy10.prediction import Prediction

# The names this script has always exported, for `from cnn_use_model import ...`.
__all__ = ["ImageError", "Prediction", "cli_main", "features", "grad_cam", "iter_predictions", "load_model",
           "main", "predict", "predict_batch"]


def main(img_path: Source, model_path: str | os.PathLike[str] = DEFAULT_CHECKPOINT) -> str:
    """The original entry point: the predicted class name of one image."""
    return predict(img_path, model_path).class_name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Classify galaxy images with a checkpoint written by cnn.py or the original project.",
        epilog="Unreadable inputs are reported (and in --out, given an error); the exit code is then 1 "
               "(0 under torchrun, which would otherwise stop the other processes).",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="an image, a folder (searched recursively for images), a Galaxy10-format .h5 file, or a "
             "catalog: a .csv or .parquet table with an image path per row, relative paths being from "
             "the table's folder (a catalog comes alone)",
    )
    parser.add_argument("--model", default=DEFAULT_CHECKPOINT,
                        help=f"checkpoint (default: {DEFAULT_CHECKPOINT})")
    parser.add_argument("--top-k", type=_positive, default=3, help="classes listed per image (default: 3)")
    parser.add_argument(
        "--out", type=Path, metavar="FILE",
        help="write a row per input to FILE.parquet or FILE.csv: catalog id, path, class id and name, "
             "confidence, entropy, margin, flag, every class's probability, error (default: none; a catalog "
             "needs one)",
    )
    parser.add_argument(
        "--embeddings", type=Path, metavar="FILE",
        help="--out FILE.parquet with each input's penultimate features (the network's embedding) in an "
             "`embedding` column; shards, --resume and torchrun as --out (default: none)",
    )
    parser.add_argument(
        "--csv", type=Path, metavar="FILE",
        help="--out FILE, written as CSV whatever its suffix (default: none)",
    )
    parser.add_argument(
        "--path-column", default="path", help="a catalog's column of image paths (default: path)"
    )
    parser.add_argument(
        "--id-column", help="a catalog column copied into the output, e.g. an object id (default: none)"
    )
    parser.add_argument(
        "--shard", metavar="I/N",
        help="classify rows I, I+N, I+2N, ... only; the last of the N shards to finish writes --out "
             "(default: every row; under torchrun: RANK/WORLD_SIZE)",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue a killed run of the same command: rows already written are kept (default: off)",
    )
    parser.add_argument(
        "--chunk-size", type=_positive, default=DEFAULT_CHUNK_ROWS,
        help=f"rows written at a time, a whole number of batches; a killed run loses at most one chunk "
             f"(default: {DEFAULT_CHUNK_ROWS})",
    )
    parser.add_argument(
        "--tta", action=argparse.BooleanOptionalAction, default=None,
        help="average over the 8 flips and quarter turns (8x the work), or with --no-tta answer from the "
             "image alone (default: as the checkpoint says: cnn.py --serve-tta)",
    )
    parser.add_argument(
        "--batch-size", type=_positive, default=16, help="images per forward pass (default: 16)"
    )
    parser.add_argument(
        "--min-confidence", type=_fraction, default=trust.DEFAULT_MIN_CONFIDENCE,
        help="flag an answer `uncertain` when its calibrated confidence is under this "
             f"(default: {trust.DEFAULT_MIN_CONFIDENCE:g})",
    )
    parser.add_argument(
        "--exact", action="store_true",
        help="float32 throughout: probabilities equal the plain model's, slower where the CPU has native "
             "bfloat16 (default: off)",
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto",
        help="auto (a GPU where there is one; under torchrun the process's LOCAL_RANK GPU), cpu or cuda "
             "(default: auto)",
    )
    return parser.parse_args(argv)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cli_main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns 1 when any input was unreadable (the rest are still classified)."""
    args = parse_args(argv)
    output = plan_output(output_file(args), csv=args.csv, shard=args.shard, resume=args.resume,
                         chunk_size=args.chunk_size, batch_size=args.batch_size)
    with torchrun_group(args.device, gpu_collectives=False, timeout=BARRIER_TIMEOUT):
        return classify_inputs(args, output)


if __name__ == "__main__":
    sys.exit(run_cli(cli_main))
