"""Catalog prediction: tables of image paths in, tables of predictions out, for catalogs of 10^8 rows.

It reads CSV and Parquet catalogs in batches (`open_catalog`), and writes an output file (`--out`) of one
row per input by way of shards: each process (a `--shard I/N`, or a torchrun rank) writes its rows into a
hidden folder beside the output, durably after every chunk, so `--resume` continues a killed run; the last
shard to finish merges them all back into input order, a block at a time (`write_predictions`).

It is given the classifying function and never imports the model code: classify.py classifies, this module
reads and writes the tables, whose columns are prediction.py's.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from galaxy10.distributed import torchrun_rank, wait_for_all
from galaxy10.errors import Galaxy10Error
from galaxy10.files import atomic_path
from galaxy10.prediction import ANSWERS, Prediction

Result = Prediction | Exception  # an Exception: the input could not be read; its message is the row's error
# Classifies rows in order, given them and how many rows of this shard an earlier run already wrote.
Classify = Callable[[Iterator["Row"], int], Iterator[tuple["Row", Result]]]

CATALOG_SUFFIXES = (".csv", ".parquet")
OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv"}
CATALOG_BATCH_ROWS = 65_536  # catalog rows read at once: a few MB of paths, whatever the table's size
DEFAULT_CHUNK_ROWS = 1024
# Far above torch.distributed's default 30 minutes: a resumed rank with little left to do may wait
# hours at the barrier for the others.
BARRIER_TIMEOUT = timedelta(days=7)
PROGRESS = "progress.json"
MERGE_CLAIM = "merging"
MERGE_ROWS = 65_536  # rows per block written to the output: a Parquet row group of ~10 MB
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
    rows: int | None  # from a Parquet footer; a CSV file is not counted in advance

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


def open_catalog(path: Path, path_column: str, id_column: str | None) -> Catalog:
    """Check a catalog's columns from its header (CSV) or footer (Parquet), reading none of its rows."""
    is_parquet = path.suffix.lower() == ".parquet"
    try:
        if is_parquet:
            file = pq.ParquetFile(path)
            schema, rows = file.schema_arrow, file.metadata.num_rows
        else:
            with pacsv.open_csv(path) as reader:
                schema, rows = reader.schema, None
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

    def size(self, total: int | None) -> int | None:
        """How many of `total` rows are this shard's."""
        return None if total is None else len(range(self.index, total, self.count))

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


# ---------------------------------------------------------------- shards: chunks on disk, resume, merge


def parts_folder(out: Path) -> Path:
    """The hidden folder beside `out` where its shards are written until they are merged into it."""
    return out.parent / f".{out.name}.parts"


def shard_folder(out: Path, shard: Shard) -> Path:
    return parts_folder(out) / f"shard-{shard.index}-of-{shard.count}"


def read_progress(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / PROGRESS).read_text())
    except FileNotFoundError:
        return None


def written_rows(progress: dict[str, Any]) -> int:
    return sum(rows for _, rows in progress["segments"])


def write_durably(path: Path, data: bytes) -> None:
    """Replace `path` by `data`, on disk before the rename: after a crash it holds the old or the new."""
    with atomic_path(path) as tmp, tmp.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


class ShardWriter:
    """One shard's predictions, made durable a chunk at a time: a killed run loses at most one chunk.

    Each run appends one Arrow IPC record batch per chunk to a segment file of its own and fsyncs it; then
    progress.json, replaced atomically, counts each segment's rows, so a segment cut short by a kill is
    read only up to its last complete chunk. A rerun with `resume` skips the rows already counted.
    """

    def __init__(self, output: Output, schema: pa.Schema, settings: dict[str, Any]) -> None:
        self.folder, self.schema, self.settings = output.folder, schema, settings
        self.chunk_rows = output.chunk_rows
        earlier = read_progress(self.folder)
        if not output.resume:
            if earlier is not None and written_rows(earlier):
                print(f"starting over: {written_rows(earlier):,} rows that an earlier run wrote for shard "
                      f"{output.shard} are discarded (--resume continues them)", file=sys.stderr)
            shutil.rmtree(self.folder, ignore_errors=True)
            earlier = None
        elif earlier is not None and earlier["settings"] != settings:
            raise Galaxy10Error(f"{self.folder} was written with other inputs, model or options: "
                                "rerun without --resume to start over")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.segments: list[list[Any]] = earlier["segments"] if earlier else []  # [file name, rows]
        self.rows_before = self.rows
        name = f"segment-{len(self.segments):04d}.arrow"
        self.segments.append([name, 0])
        self._file = (self.folder / name).open("wb")
        self._writer = pa.ipc.new_stream(self._file, schema)
        self._pending: list[dict[str, Any]] = []

    @property
    def rows(self) -> int:
        """Rows on disk, this run's and earlier runs'."""
        return sum(rows for _, rows in self.segments)

    def add(self, record: dict[str, Any]) -> None:
        self._pending.append(record)
        if len(self._pending) == self.chunk_rows:
            self._flush()

    def finish(self) -> int:
        """Write the last chunk and mark the shard done; returns its rows."""
        if self._pending:
            self._flush()
        self.close()
        self._save(done=True)
        return self.rows

    def close(self) -> None:
        if not self._file.closed:
            self._writer.close()
            self._file.close()

    def _flush(self) -> None:
        self._writer.write_table(pa.Table.from_pylist(self._pending, schema=self.schema))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.segments[-1][1] += len(self._pending)
        self._pending = []
        self._save(done=False)

    def _save(self, done: bool) -> None:
        progress = {"settings": self.settings, "segments": self.segments, "done": done}
        write_durably(self.folder / PROGRESS, json.dumps(progress).encode())


def shard_batches(folder: Path, progress: dict[str, Any]) -> Iterator[pa.RecordBatch]:
    """A finished shard's rows in order: each segment up to the rows its progress.json counts."""
    for name, rows in progress["segments"]:
        if rows == 0:
            continue  # a run killed before its first chunk: the file may not even hold the schema
        with pa.OSFile(str(folder / name)) as file:
            reader = pa.ipc.open_stream(file)
            while rows > 0:  # never past the counted rows: a killed run's torn chunk may follow them
                batch = reader.read_next_batch()
                rows -= batch.num_rows
                yield batch


class RowBlocks:
    """A shard's rows served `n` at a time, whatever the chunks they were written in."""

    def __init__(self, batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> None:
        self._batches = batches
        self._buffer = schema.empty_table()

    def take(self, n: int) -> pa.Table:
        while self._buffer.num_rows < n and (batch := next(self._batches, None)) is not None:
            self._buffer = pa.concat_tables([self._buffer, pa.Table.from_batches([batch])])
        taken, self._buffer = self._buffer.slice(0, n), self._buffer.slice(n)
        return taken


def interleave(blocks: list[pa.Table]) -> pa.Table:
    """One block from each shard as rows in input order: row j of shard i is row j * N + i."""
    starts = np.cumsum([0] + [len(block) for block in blocks[:-1]])
    position = np.arange(sum(len(block) for block in blocks))
    return pa.concat_tables(blocks).take(starts[position % len(blocks)] + position // len(blocks))


@contextmanager
def table_writer(path: Path, schema: pa.Schema, fmt: str) -> Iterator[pq.ParquetWriter | pacsv.CSVWriter]:
    """A Parquet or CSV file written a table at a time (in Parquet, a row group per table)."""
    writer = pq.ParquetWriter(str(path), schema) if fmt == "parquet" else pacsv.CSVWriter(str(path), schema)
    try:
        yield writer
    finally:
        writer.close()


def merge_shards(output: Output, schema: pa.Schema, settings: dict[str, Any]) -> int:
    """Interleave the finished shards back into input order and write them to the output file a block at
    a time, then remove them; returns the rows written. Memory holds one block, whatever the input's size."""
    count = output.shard.count
    folders = [shard_folder(output.path, Shard(i, count)) for i in range(count)]
    progress = [finished_progress(folder, settings) for folder in folders]
    sizes = [written_rows(p) for p in progress]
    if sizes != [Shard(i, count).size(sum(sizes)) for i in range(count)]:
        raise Galaxy10Error(f"the shards in {parts_folder(output.path)} do not add up (rows: {sizes}): "
                            "rerun them without --resume")
    readers = [RowBlocks(shard_batches(f, p), schema) for f, p in zip(folders, progress, strict=True)]
    rows_per_shard = max(1, MERGE_ROWS // count)
    with atomic_path(output.path) as tmp, table_writer(tmp, schema, output.fmt) as writer:
        while (blocks := [reader.take(rows_per_shard) for reader in readers])[0].num_rows:
            writer.write_table(interleave(blocks))
    shutil.rmtree(parts_folder(output.path), ignore_errors=True)
    return sum(sizes)


def finished_progress(folder: Path, settings: dict[str, Any]) -> dict[str, Any]:
    progress = read_progress(folder)
    if progress is None or not progress["done"]:
        raise Galaxy10Error(f"{folder} is not finished: run its shard again with --resume")
    if progress["settings"] != settings:
        raise Galaxy10Error(f"{folder} was written with other inputs, model or options: "
                            "run its shard again without --resume")
    return progress


def shards_done(output: Output) -> bool:
    count = output.shard.count
    progress = [read_progress(shard_folder(output.path, Shard(i, count))) for i in range(count)]
    return all(p is not None and p["done"] for p in progress)


def claim_merge(out: Path) -> bool:
    """Whether this process is the one to merge (the last shards of a SLURM array may finish together)."""
    try:
        os.close(os.open(parts_folder(out) / MERGE_CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def finish_output(output: Output, shard_rows: int, schema: pa.Schema, settings: dict[str, Any]) -> None:
    """Merge the shards into the output file if this process is the one to, else say who will."""
    if output.torchrun:
        wait_for_all()  # every rank has finished its shard
        all_done = merging = output.shard.index == 0
    else:
        all_done = shards_done(output)
        merging = all_done and claim_merge(output.path)
    if merging:
        try:
            rows = merge_shards(output, schema, settings)
        finally:
            (parts_folder(output.path) / MERGE_CLAIM).unlink(missing_ok=True)
        print(f"wrote {output.path} ({rows:,} rows)")
        return
    done = f"shard {output.shard} done ({shard_rows:,} rows)"
    if output.torchrun:
        print(f"{done}; rank 0 writes {output.path}")
    elif all_done:
        claim = parts_folder(output.path) / MERGE_CLAIM
        print(f"{done}; another process is writing {output.path} (if none is, delete {claim} and rerun)")
    else:
        print(f"{done}; the last of the {output.shard.count} shards to finish writes {output.path}")


def write_predictions(
    output: Output, rows: Iterable[Row], classify: Classify, schema: pa.Schema, settings: dict[str, Any],
    id_column: str | None = None,
) -> bool:
    """Classify this process's shard of `rows` and write a record per row to its shard folder, durably a
    chunk at a time (with output.resume, skipping the rows an earlier run wrote), then merge the shards into
    the output file where this process is the one to. Returns False when Ctrl-C stopped it: what was written
    is kept for --resume."""
    writer = ShardWriter(output, schema, settings)
    try:
        remaining = output.shard.select(rows, writer.rows_before)
        for row, result in classify(remaining, writer.rows_before):
            writer.add(output_record(row, result, id_column))
        finish_output(output, writer.finish(), schema, settings)
    except KeyboardInterrupt:
        print(f"interrupted: the {writer.rows:,} rows written are kept: add --resume to continue",
              file=sys.stderr)
        return False
    finally:
        writer.close()
    return True
