"""Catalog prediction: tables of image paths in, tables of predictions out, for catalogs of 10^8 rows.

It reads CSV and Parquet catalogs in batches (`open_catalog`), and plans the output file (`--out`): its
format, this process's shard (`plan_output`) and its columns (`output_schema`, from prediction.py's
ANSWERS); shards.py writes it.

It is given the classifying function and never imports the model code: classify.py classifies, this module
reads and writes the tables, whose columns are prediction.py's.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from galaxy10.distributed import torchrun_rank
from galaxy10.errors import Galaxy10Error
from galaxy10.prediction import ANSWERS, Prediction

Result = Prediction | Exception  # an Exception: the input could not be read; its message is the row's error
# Classifies rows in order, given them and how many rows of this shard an earlier run already wrote.
Classify = Callable[[Iterator["Row"], int], Iterator[tuple["Row", Result]]]

CATALOG_SUFFIXES = (".csv", ".parquet")
OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv"}
CATALOG_BATCH_ROWS = 65_536  # catalog rows read at once: a few MB of paths, whatever the table's size
CSV_COUNT_BYTES = 1 << 22  # read at a time to count a CSV catalog's rows
DEFAULT_CHUNK_ROWS = 1024
# Far above torch.distributed's default 30 minutes: a resumed rank with little left to do may wait
# hours at the barrier for the others.
BARRIER_TIMEOUT = timedelta(days=7)
ARROW_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string()}  # an answer field's column type


# ---------------------------------------------------------------- catalogs in


@dataclass(frozen=True)
class Row:
    """One input: its name in the output, what the classifying function decodes (a path, or an image),
    its catalog id, and whatever the caller wants back with its result (`tag`)."""

    name: str
    source: Any
    id: Any = None
    tag: Any = None


@dataclass(frozen=True)
class Catalog:
    """A CSV or Parquet table naming an image per row, read in batches (it may hold 10^8 rows).

    Relative paths are taken from the table's folder, so a catalog moves with its images."""

    path: Path
    path_column: str
    id_field: pa.Field | None  # the --id-column, carried into the output with its type
    rows: int  # from a Parquet footer, or a CSV file's lines

    def entries(self) -> Iterator[Row]:
        folder = self.path.parent
        for batch in self._batches():
            paths = batch.column(self.path_column).to_pylist()
            ids = batch.column(self.id_field.name).to_pylist() if self.id_field else [None] * len(paths)
            for value, ident in zip(paths, ids, strict=True):
                yield Row(value or "", folder / value if value else "", ident)

    def _batches(self) -> Iterator[pa.RecordBatch]:
        columns = list(dict.fromkeys([self.path_column, *([self.id_field.name] if self.id_field else [])]))
        try:
            if self.path.suffix.lower() == ".parquet":
                yield from pq.ParquetFile(self.path).iter_batches(CATALOG_BATCH_ROWS, columns=columns)
            else:
                # Read as text, so that an id keeps its leading zeros and a path is never parsed as a number.
                types = dict.fromkeys(columns, pa.string())
                options = pacsv.ConvertOptions(include_columns=columns, column_types=types)
                yield from pacsv.open_csv(self.path, convert_options=options)
        except (pa.ArrowException, OSError) as err:
            raise Galaxy10Error(f"{self.path} cannot be read ({err}): check the table") from None


def csv_rows(path: Path) -> int:
    """A CSV table's rows (its lines less the header), counted at disk speed for the progress bar's total and
    time left: a path never holds a line break, so the lines are the rows."""
    lines, last = 0, b"\n"
    with path.open("rb") as file:
        while block := file.read(CSV_COUNT_BYTES):
            lines += block.count(b"\n")
            last = block[-1:]
    return max(0, lines + (last != b"\n") - 1)


def open_catalog(path: Path, path_column: str, id_column: str | None) -> Catalog:
    """Check a catalog's columns from its header (CSV) or footer (Parquet), reading none of its rows."""
    is_parquet = path.suffix.lower() == ".parquet"
    try:
        if is_parquet:
            file = pq.ParquetFile(path)
            schema, rows = file.schema_arrow, file.metadata.num_rows
        else:
            with pacsv.open_csv(path) as reader:
                schema, rows = reader.schema, csv_rows(path)
    except (pa.ArrowException, OSError) as err:
        kind = "Parquet" if is_parquet else "CSV"
        raise Galaxy10Error(f"{path} is not a readable {kind} table ({err})") from None
    columns = ", ".join(schema.names[:10]) + (", ..." if len(schema.names) > 10 else "")
    if path_column not in schema.names:
        raise Galaxy10Error(f"{path} has no column {path_column!r} (it has {columns}): "
                            "name its column of image paths with --path-column")
    path_type = schema.field(path_column).type
    if not (pa.types.is_string(path_type) or pa.types.is_large_string(path_type)):
        raise Galaxy10Error(f"{path}: column {path_column!r} holds {path_type}, not image paths: "
                            "name its column of image paths with --path-column")
    if id_column is None:
        return Catalog(path, path_column, None, rows)
    if id_column not in schema.names:
        raise Galaxy10Error(f"{path} has no column {id_column!r} for --id-column (it has {columns})")
    id_type = schema.field(id_column).type if is_parquet else pa.string()
    return Catalog(path, path_column, pa.field(id_column, id_type), rows)


# ---------------------------------------------------------------- the output file: format, rows, shards


@dataclass(frozen=True)
class Shard:
    """Rows index, index + count, index + 2 count, ...: row k belongs to shard k % count."""

    index: int = 0
    count: int = 1

    def select(self, rows: Iterable[Row], skip: int = 0) -> Iterator[Row]:
        """This shard's rows, less its first `skip` (written by an earlier run)."""
        return islice(rows, self.index + skip * self.count, None, self.count)

    def size(self, total: int) -> int:
        """How many of `total` rows are this shard's."""
        return len(range(self.index, total, self.count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if match is None or int(match[1]) >= int(match[2]):
        raise Galaxy10Error(
            f"--shard {text}: give I/N with 0 <= I < N, e.g. --shard 0/4 to --shard 3/4 "
            "(in a SLURM array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)"
        )
    return Shard(int(match[1]), int(match[2]))


@dataclass(frozen=True)
class Output:
    """Where this process's predictions go: the file, its format, and the shard this process writes."""

    path: Path | None
    fmt: str  # "parquet" or "csv"
    shard: Shard
    torchrun: bool  # the shards are torchrun's processes: they meet at a barrier, then rank 0 merges
    resume: bool
    chunk_rows: int

    @property
    def folder(self) -> Path:
        """This shard's folder, in the hidden folder beside the output file."""
        return shard_folder(self.path, self.shard)


def plan_output(
    out: Path | None = None, *, csv: Path | None = None, shard: str | None = None, resume: bool = False,
    chunk_size: int = DEFAULT_CHUNK_ROWS, batch_size: int = 1,
) -> Output:
    """The output file (--out, or --csv), its format and this process's shard, checked before anything is
    loaded."""
    process, world = torchrun_rank()
    if world > 1 and shard:
        raise Galaxy10Error("under torchrun a process's shard is its RANK of WORLD_SIZE: drop --shard")
    this_shard = Shard(process, world) if world > 1 else parse_shard(shard or "0/1")
    path, fmt = output_file(out, csv)
    if path is None and (world > 1 or resume):
        raise Galaxy10Error(f"{'--resume' if resume else 'torchrun'} needs an output file: "
                            "add --out predictions.parquet")
    # Whole batches per chunk: a resumed run then batches images as an uninterrupted one, so computes
    # the same rows to the last bit.
    chunk_rows = -(-chunk_size // batch_size) * batch_size
    return Output(path, fmt, this_shard, world > 1, resume, chunk_rows)


def output_file(out: Path | None, csv: Path | None) -> tuple[Path | None, str]:
    if csv is not None and out is not None:
        raise Galaxy10Error("give --out or --csv, not both (--csv FILE is --out FILE written as CSV)")
    path = out if out is not None else csv
    if path is None:
        return None, ""
    fmt = "csv" if csv is not None else OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise Galaxy10Error(f"--out {path}: name a .parquet or .csv file")
    if not path.parent.is_dir():
        raise Galaxy10Error(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise Galaxy10Error(f"--out {path} is a folder: name a .parquet or .csv file")
    return path, fmt


def output_schema(class_names: Sequence[str], id_field: pa.Field | None = None,
                  embedding_size: int | None = None) -> pa.Schema:
    """One row per input: the catalog's id (with --id-column), the path, the prediction's answer fields
    (prediction.ANSWERS: the class, its confidence, how far to trust it), every class's probability, and
    why the input could not be read (null where it could)."""
    fields = [
        pa.field("path", pa.string()),
        *(pa.field(name, ARROW_TYPES[kind]) for name, (kind, _) in ANSWERS.items()),
        *(pa.field(name, pa.float64()) for name in class_names),
        pa.field("error", pa.string()),
    ]
    if embedding_size is not None:  # --embeddings: the penultimate features, a fixed-size list per row
        fields.append(pa.field("embedding", pa.list_(pa.float32(), embedding_size)))
    if id_field is None:
        return pa.schema(fields)
    if id_field.name in (field.name for field in fields):
        raise Galaxy10Error(f"--id-column {id_field.name!r} is also the name of an output column: "
                            "rename it in the catalog")
    return pa.schema([id_field, *fields])


def output_record(row: Row, result: Result, id_column: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {"path": row.name}
    if id_column is not None:
        record[id_column] = row.id
    if isinstance(result, Exception):
        record["error"] = str(result)
    else:
        record.update(result.answers())
        if result.embedding is not None:
            record["embedding"] = list(result.embedding)
        record.update(zip(result.class_names, result.probabilities, strict=True))
    return record


def file_identity(path: str | os.PathLike[str]) -> list[Any]:
    """The resolved path and, for a file, its size and modification time: a changed file is another input."""
    resolved = Path(path).resolve()
    if not resolved.is_file():
        return [str(resolved)]
    stat = resolved.stat()
    return [str(resolved), stat.st_size, stat.st_mtime_ns]


def parts_folder(out: Path) -> Path:
    """The hidden folder beside `out` where its shards are written until they are merged into it."""
    return out.parent / f".{out.name}.parts"


def shard_folder(out: Path, shard: Shard) -> Path:
    return parts_folder(out) / f"shard-{shard.index}-of-{shard.count}"
