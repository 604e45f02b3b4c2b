"""What the inference command line was asked to classify, as rows in order: image files as given, folders
searched recursively, Galaxy10-format .h5 files row by row (scored against their `ans` at the end), or one
catalog (catalog.py) row by row; and what could not be found, to report and go on without.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from galaxy10.catalog import CATALOG_SUFFIXES, Catalog, Row, open_catalog
from galaxy10.dataset import CHUNK_ROWS, Galaxy10File, open_galaxy10
from galaxy10.errors import Galaxy10Error
from galaxy10.images import IMAGE_SUFFIXES, is_image_file

H5_SUFFIXES = (".h5", ".hdf5")


@dataclass
class H5Input:
    """A Galaxy10-format file: its `images` rows are classified; `ans`, where present, scores them."""

    file: Galaxy10File
    predicted: np.ndarray  # class id per row, -1 until predicted

    @property
    def rows(self) -> int:
        return self.file.rows

    def row_name(self, row: int) -> str:
        return f"{self.file.path}#{row}"

    def images(self) -> Iterator[np.ndarray]:
        return self.file.iter_images(CHUNK_ROWS)


def open_h5(path: Path) -> H5Input:
    """A Galaxy10-format file (an (N, H, W, 3) uint8 `images` dataset, labelled or not) to classify."""
    file = open_galaxy10(path, complete=False)
    return H5Input(file, np.full(file.rows, -1, dtype=np.int64))


@dataclass
class Inputs:
    """Everything the command line was asked to classify, in order."""

    sources: list[Path | H5Input | Catalog]
    problems: list[str]

    def rows(self) -> Iterator[Row]:
        for source in self.sources:
            if isinstance(source, H5Input):
                for row, image in enumerate(source.images()):
                    yield Row(source.row_name(row), image, tag=(source, row))
            elif isinstance(source, Catalog):
                yield from source.entries()
            else:
                yield Row(str(source), source)

    def names(self) -> Iterator[str]:
        """Every row's name, without reading an image (a catalog's rows are not printed, so not named)."""
        for source in self.sources:
            if isinstance(source, H5Input):
                yield from map(source.row_name, range(source.rows))
            elif isinstance(source, Path):
                yield str(source)

    def count(self) -> int:
        """How many rows, without reading an image."""
        return sum(1 if isinstance(source, Path) else source.rows for source in self.sources)

    @property
    def catalog(self) -> Catalog | None:
        return next((source for source in self.sources if isinstance(source, Catalog)), None)


def find_inputs(paths: Sequence[str], path_column: str = "path", id_column: str | None = None) -> Inputs:
    """Expand the PATH arguments: images as given, folders searched recursively, .h5 files row by row, and a
    catalog (which comes alone) row by row."""
    catalog = next((Path(p) for p in paths if Path(p).suffix.lower() in CATALOG_SUFFIXES), None)
    if catalog is not None:
        if len(paths) > 1:
            raise Galaxy10Error(f"a catalog comes alone: classify {catalog} in a run of its own")
        if not catalog.is_file():
            raise Galaxy10Error(f"{catalog} not found: give the path of a CSV or Parquet catalog")
        return Inputs([open_catalog(catalog, path_column, id_column)], [])
    if id_column is not None:
        raise Galaxy10Error("--id-column names a column of a catalog: give a .csv or .parquet table as PATH")
    inputs = Inputs([], [])
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_image_file(p))
            if not found:
                inputs.problems.append(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            inputs.sources += found
        elif path.suffix.lower() in H5_SUFFIXES and path.is_file():
            try:
                inputs.sources.append(open_h5(path))
            except Galaxy10Error as err:
                inputs.problems.append(str(err))
        elif path.is_file():
            inputs.sources.append(path)
        else:
            inputs.problems.append(f"{path} not found")
    return inputs
