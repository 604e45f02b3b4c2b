"""What `cnn_use_model.py` does with its command line: check the inputs (inputs.py), classify this process's
rows with a progress bar, print a line per input (prediction.ResultLines) or write them to an output file
by way of shards (catalog.py), score labelled .h5 files, and report what could not be read.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import tee
from pathlib import Path
from typing import Any

from galaxy10.catalog import Output, Row, file_identity, output_schema, write_predictions
from galaxy10.errors import Galaxy10Error
from galaxy10.images import ImageError
from galaxy10.inference import iter_predictions, load_model
from galaxy10.inputs import H5Input, Inputs, find_inputs
from galaxy10.prediction import Prediction, ResultLines
from galaxy10.progress import progress_bar, write
from galaxy10.reports import format_accuracy


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What decides the predictions: shards written with other settings are never resumed or merged."""
    return {
        "inputs": [file_identity(path) for path in args.paths],
        "model": file_identity(args.model),
        "path_column": args.path_column,
        "id_column": args.id_column,
        "tta": args.tta,
        "exact": args.exact,
        "min_confidence": args.min_confidence,
        "embeddings": args.embeddings is not None,
    }


def output_file(args: argparse.Namespace) -> Path | None:
    """The output file: --embeddings FILE (a Parquet file: a list column has no CSV form) or --out FILE."""
    if args.embeddings is None:
        return args.out
    if args.out is not None or args.csv is not None:
        raise Galaxy10Error("--embeddings FILE is --out FILE with an embedding column: give one of them")
    if args.embeddings.suffix.lower() != ".parquet":
        raise Galaxy10Error(f"--embeddings {args.embeddings}: name a .parquet file (a CSV cannot hold the "
                            "embedding vectors)")
    return args.embeddings


def classify_inputs(args: argparse.Namespace, output: Output) -> int:
    """Check the inputs, then classify this process's rows: printed, or (with --out) written to its shard
    by catalog.write_predictions, which merges the shards where this process is the one to. Returns the exit
    code."""
    model = load_model(args.model, args.device)
    inputs = find_inputs(args.paths, args.path_column, args.id_column)
    for problem in inputs.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    if inputs.count() == 0:
        raise Galaxy10Error("nothing to classify: give image files, folders of images, a Galaxy10 .h5 file "
                            "or a catalog")
    if inputs.catalog is not None and output.path is None:
        raise Galaxy10Error("a catalog's predictions go to a file: add --out predictions.parquet (or .csv)")
    lines = None if inputs.catalog else ResultLines(inputs.names(), model.class_names)
    classify = RowClassifier(args, output.shard.size(inputs.count()), lines)
    if output.path is None:
        for _ in classify(output.shard.select(inputs.rows()), 0):
            pass
    else:
        width = model.embedding_size if args.embeddings else None
        schema = output_schema(model.class_names, inputs.catalog and inputs.catalog.id_field, width)
        if not write_predictions(output, inputs.rows(), classify, schema, run_settings(args), args.id_column):
            return 130
    failures = len(inputs.problems) + classify.failures
    return final_report(inputs, model.class_names, failures, output.torchrun)


def final_report(inputs: Inputs, class_names: Sequence[str], failures: int, torchrun: bool) -> int:
    """Accuracy for labelled .h5 files, the count of unreadable inputs; returns the exit code."""
    for source in inputs.sources:
        if isinstance(source, H5Input) and source.file.labels is not None:
            done = source.predicted >= 0
            print(format_accuracy(str(source.file.path), source.file.labels[done], source.predicted[done],
                                  class_names))
    if not failures:
        return 0
    print(f"{failures} input(s) could not be read (listed above)", file=sys.stderr)
    # A non-zero exit makes torchrun stop the other processes and report the run as failed.
    return 0 if torchrun else 1


@dataclass
class RowClassifier:
    """The command line's classifying function, which catalog.write_predictions is given: predicts rows in
    order with a progress bar, prints each in `lines`, notes .h5 rows' classes, counts the unreadable."""

    args: argparse.Namespace
    total: int | None  # rows of this shard, where known in advance
    lines: ResultLines | None
    failures: int = 0

    def __call__(self, rows: Iterator[Row], done: int) -> Iterator[tuple[Row, Prediction | ImageError]]:
        to_model, to_output = tee(rows)
        args = self.args
        predictions = iter_predictions(
            (row.source for row in to_model), args.model, tta=args.tta, batch_size=args.batch_size,
            top_k=args.top_k, exact=args.exact, device=args.device, min_confidence=args.min_confidence,
            embeddings=args.embeddings is not None,
        )
        if self.lines:
            write(self.lines.header())
        with progress_bar(total=self.total, initial=done, unit="img", desc="classifying") as bar:
            for row, result in zip(to_output, predictions, strict=True):
                bar.update()
                self.show(row, result)
                yield row, result

    def show(self, row: Row, result: Prediction | ImageError) -> None:
        if isinstance(result, ImageError):
            self.failures += 1
            write(f"unreadable: {result}", file=sys.stderr)
            return
        if self.lines:
            write(self.lines.row(row.name, result))
        if row.tag is not None:  # an .h5 file's row, scored against its `ans` at the end
            h5, index = row.tag
            h5.predicted[index] = result.class_id
