"""What `cnn_use_model.py` does with its command line: check the inputs (inputs.py), classify this process's
rows with a progress bar, print a line per input (prediction.ResultLines) or write them to an output file
by way of shards (catalog.py), score labelled .h5 files, and report what could not be read.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import tee
from pathlib import Path
from typing import Any

import numpy as np

from galaxy10 import trust
from galaxy10.catalog import Output, Row, file_identity, output_schema
from galaxy10.dataset import CLASS_NAMES
from galaxy10.errors import Galaxy10Error
from galaxy10.images import ImageError
from galaxy10.inference import InferenceModel, iter_predictions, load_model
from galaxy10.inputs import H5Input, Inputs, find_inputs
from galaxy10.prediction import Prediction, ResultLines
from galaxy10.progress import progress_bar, write
from galaxy10.reports import format_accuracy
from galaxy10.shards import write_predictions


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
    by shards.write_predictions, which merges the shards where this process is the one to. Returns the exit
    code."""
    model = load_model(args.model, args.device)
    if output.shard.index == 0:  # said once per run, however many processes share it
        say_what_the_model_learned_from(model)
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
        if not write_predictions(output, inputs.rows(), classify, schema, run_settings(args), args.id_column,
                                 about_the_model(model)):
            return 130
    print(classify.flag_summary(output.shard.count > 1), file=sys.stderr)
    failures = len(inputs.problems) + classify.failures
    return final_report(inputs, model, failures, output.torchrun)


def say_what_the_model_learned_from(model: InferenceModel) -> None:
    """One line on stderr: the model and what it learned from; a warning where that was synthetic."""
    record = model.record
    print(f"model {model.name}: learned from {record.describe_training()}", file=sys.stderr)
    warning = record.synthetic_warning()
    if warning:
        print(f"warning: {model.name}: {warning}", file=sys.stderr)


def about_the_model(model: InferenceModel) -> dict[str, Any]:
    """What an output file says of the model that answered (its metadata; shards.merge_shards adds the
    counts)."""
    record = model.record
    return {"model": model.name, "architecture": record.title, "members": record.members,
            "class_names": list(record.class_names), "learned_from": record.describe_training(),
            "warning": record.synthetic_warning(), "temperature": record.temperature}


def final_report(inputs: Inputs, model: InferenceModel, failures: int, torchrun: bool) -> int:
    """Accuracy for labelled .h5 files whose classes are the model's, the count of unreadable inputs;
    returns the exit code."""
    for source in inputs.sources:
        if isinstance(source, H5Input) and source.file.labels is not None:
            mismatch = class_mismatch(source, model.class_names)
            if mismatch:
                print(f"not scored: {mismatch}", file=sys.stderr)
                continue
            done = source.predicted >= 0
            print(format_accuracy(str(source.file.path), source.file.labels[done], source.predicted[done],
                                  model.class_names))
    if not failures:
        return 0
    print(f"{failures} input(s) could not be read (listed above)", file=sys.stderr)
    # A non-zero exit makes torchrun stop the other processes and report the run as failed.
    return 0 if torchrun else 1


def class_mismatch(source: H5Input, class_names: Sequence[str]) -> str | None:
    """Why a labelled .h5 file cannot be scored by this model (its labels are other classes), or None: a
    Galaxy10-format file's ids 0-9 are Galaxy10's classes for a model of them; other ids are scored by a
    model whose classes are those ids' folder names (cnn.py's class folders without --class-names)."""
    file = source.file
    labels = sorted(int(label) for label in np.unique(file.labels))
    if tuple(class_names) == CLASS_NAMES and labels[-1] < len(CLASS_NAMES):
        return None
    if labels[-1] < len(class_names) and list(class_names) == [str(i) for i in range(len(class_names))]:
        return None
    theirs = "Galaxy10's ten classes" if file.has_galaxy10_classes else f"the class ids {labels}"
    return (f"{file.path}'s labels are {theirs}, the model's classes are {list(class_names)}: its answers "
            "are above, without an accuracy")


@dataclass
class RowClassifier:
    """The command line's classifying function, which shards.write_predictions is given: predicts rows in
    order with a progress bar, prints each in `lines`, notes .h5 rows' classes, counts the unreadable."""

    args: argparse.Namespace
    total: int  # rows of this shard
    lines: ResultLines | None
    failures: int = 0
    flags: Counter[str] = field(default_factory=Counter)

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
        self.flags[result.flag] += 1
        if self.lines:
            write(self.lines.row(row.name, result))
        if row.tag is not None:  # an .h5 file's row, scored against its `ans` at the end
            h5, index = row.tag
            h5.predicted[index] = result.class_id

    def flag_summary(self, shard: bool) -> str:
        """How many answers each flag got, in one line."""
        answered = sum(self.flags.values())
        of = f"of this shard's {answered:,} answers" if shard else f"of {answered:,} answers"
        return (f"{self.flags[trust.UNLIKE_TRAINING]:,} {of} flagged unlike-training, "
                f"{self.flags[trust.UNCERTAIN]:,} uncertain")
