"""Write a synthetic Galaxy10 DECaLS file: procedurally rendered galaxies in the official HDF5 format.

    python sample_data.py --out galaxy10_sample.h5 --n 2000

writes datasets ``images`` (N,H,W,3) uint8, ``ans`` (N,) uint8 and ``ra``, ``dec``, ``redshift``,
``pxscale`` (N,) float64, so every later script runs without downloading the real file. Each class looks
like its name (round, cigar-shaped, barred, tightly or loosely wound, edge-on with or without a
bulge...), class counts follow the real file's, and the same seed gives a byte-identical file
however many worker processes render it.

This script is the command line; the rendering is galaxy10/synthetic.py's.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from galaxy10.errors import run_cli
from galaxy10.synthetic import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_output_path, write_preview, write_sample


def main(argv: Sequence[str] | None = None) -> None:
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("galaxy10_sample.h5"),
                        help="HDF5 file to write (default: galaxy10_sample.h5)")
    parser.add_argument("--n", type=int, default=2000,
                        help="number of images; 17736 gives the real file's class counts (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--image-size", type=int, default=256,
                        help=f"image side in pixels, {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE} (default: 256, as the "
                             "real file)")
    parser.add_argument("--workers", type=int, default=cpus,
                        help=f"rendering processes (default: the CPU count, {cpus} here)")
    parser.add_argument("--preview", type=Path, default=None,
                        help="also write a PNG contact sheet of 8 images per class (default: none)")
    args = parser.parse_args(argv)
    if args.preview is not None:
        check_output_path(args.preview)
    path = write_sample(args.out, n=args.n, seed=args.seed, image_size=args.image_size, workers=args.workers)
    print(f"wrote {args.n} images of {args.image_size} px to {path}")
    if args.preview is not None:
        print(f"wrote contact sheet {write_preview(path, args.preview)}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
