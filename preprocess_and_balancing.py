"""Export Galaxy10 like load_data.py, then balance the training classes with augmented copies.

    python preprocess_and_balancing.py --h5 Galaxy10_DECals.h5 --out balanced_data

``val/`` holds exactly the files load_data.py writes there for the same --seed and --val-size.
``train/`` holds the originals plus ``aug_{label}_{counter:05d}.png`` copies until every class has
as many images as the largest one (or --target). Copies are flipped, rotated by any angle (the
corners are filled by reflecting the sky, never black) and mildly changed in brightness and
contrast; each copy's source row is in ``manifest.csv``.

This script is the command line; the export is galaxy10/export.py's, the balancing galaxy10/balancing.py's.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from galaxy10.balancing import BALANCED_FIELDS, plan_augmentations, write_augmented_copies
from galaxy10.errors import run_cli
from galaxy10.export import (
    add_export_arguments,
    export_images,
    load_and_split,
    print_summary,
    staged_output,
    write_dataset_info,
    write_manifest,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_export_arguments(parser, default_out="balanced_data")
    parser.add_argument("--target", type=int, default=None,
                        help="images per training class (default: the largest class's count)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    source, is_val = load_and_split(args)
    train_rows = np.flatnonzero(~is_val)
    plan = plan_augmentations(source.labels[train_rows], train_rows, args.target, args.seed)
    with staged_output(args.out, args.force) as stage:
        rows = export_images(source, is_val, stage, args.workers)
        for row in rows:
            row["source_index"] = row["index"]
        rows += write_augmented_copies(source, plan, stage, args.workers)
        write_manifest(stage / "manifest.csv", rows, BALANCED_FIELDS)
        write_dataset_info(stage, source)
    print_summary(args.out, rows)


if __name__ == "__main__":
    sys.exit(run_cli(main))
