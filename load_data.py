"""Export Galaxy10 DECaLS from HDF5 to class folders with a seeded, stratified train/val split.

    python load_data.py --h5 Galaxy10_DECals.h5 --out data

writes ``data/{train,val}/{label}/img_{index:05d}.png`` (``index`` = row in the HDF5 file) and
``data/manifest.csv``. The file is read in chunks by several worker processes, so memory stays
flat however large it is; the output appears only once it is complete.

This script is the command line; the export itself is galaxy10/export.py's.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
    add_export_arguments(parser, default_out="data")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    source, is_val = load_and_split(args)
    with staged_output(args.out, args.force) as stage:
        rows = export_images(source, is_val, stage, args.workers)
        write_manifest(stage / "manifest.csv", rows)
        write_dataset_info(stage, source)
    print_summary(args.out, rows)


if __name__ == "__main__":
    sys.exit(run_cli(main))
