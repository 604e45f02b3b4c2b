"""An output file (`--out`) written by way of shards: each process (a `--shard I/N`, or a torchrun rank)
writes its rows into a hidden folder beside the output, durably after every chunk, so `--resume` continues a
killed run (`ShardWriter`); the last shard to finish merges them all back into input order, a block at a
time, with what the run says of itself (the model, what it learned from, how many rows each flag got) in
the Parquet file's metadata or beside a CSV file (`write_predictions`, `merge_shards`).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from galaxy10.catalog import Classify, Output, Row, Shard, output_record, parts_folder, shard_folder
from galaxy10.distributed import wait_for_all
from galaxy10.errors import Galaxy10Error
from galaxy10.files import atomic_path

PROGRESS = "progress.json"
MERGE_CLAIM = "merging"
MERGE_ROWS = 65_536  # rows per block written to the output: a Parquet row group of ~10 MB
ABOUT_KEY = "galaxy10"  # the Parquet metadata key of what a run says of itself (JSON)


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


def merge_shards(output: Output, schema: pa.Schema, settings: dict[str, Any], about: dict[str, Any]
                 ) -> dict[str, Any]:
    """Interleave the finished shards back into input order and write them to the output file a block at
    a time, with `about` and the rows' counts (rows, each flag's, the unreadable) as the file's metadata
    (ABOUT_KEY in a Parquet file's, a CSV file's in <file>.json beside it); then remove the shards. Returns
    what was written about the run. Memory holds one block, whatever the input's size."""
    count = output.shard.count
    folders = [shard_folder(output.path, Shard(i, count)) for i in range(count)]
    progress = [finished_progress(folder, settings) for folder in folders]
    sizes = [written_rows(p) for p in progress]
    if sizes != [Shard(i, count).size(sum(sizes)) for i in range(count)]:
        raise Galaxy10Error(f"the shards in {parts_folder(output.path)} do not add up (rows: {sizes}): "
                            "rerun them without --resume")
    readers = [RowBlocks(shard_batches(f, p), schema) for f, p in zip(folders, progress, strict=True)]
    rows_per_shard = max(1, MERGE_ROWS // count)
    counts: Counter[str] = Counter()
    with atomic_path(output.path) as tmp:
        with table_writer(tmp, schema, output.fmt) as writer:
            while (blocks := [reader.take(rows_per_shard) for reader in readers])[0].num_rows:
                block = interleave(blocks)
                counts.update(flag for flag in block.column("flag").to_pylist() if flag is not None)
                counts["unreadable"] += block.num_rows - block.column("error").null_count
                writer.write_table(block)
            flags = {flag: n for flag, n in counts.items() if flag != "unreadable"}
            about = {**about, "rows": sum(sizes), "flags": flags, "unreadable": counts["unreadable"]}
            if output.fmt == "parquet":
                writer.add_key_value_metadata({ABOUT_KEY: json.dumps(about)})
        if output.fmt == "csv":
            write_durably(about_path(output.path), json.dumps(about, indent=2).encode())
    shutil.rmtree(parts_folder(output.path), ignore_errors=True)
    return about


def about_path(out: Path) -> Path:
    """Where a CSV output's metadata goes: beside it, <file>.json."""
    return out.with_name(f"{out.name}.json")


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


def finish_output(output: Output, shard_rows: int, schema: pa.Schema, settings: dict[str, Any],
                  about: dict[str, Any]) -> None:
    """Merge the shards into the output file if this process is the one to, else say who will."""
    if output.torchrun:
        wait_for_all()  # every rank has finished its shard
        all_done = merging = output.shard.index == 0
    else:
        all_done = shards_done(output)
        merging = all_done and claim_merge(output.path)
    if merging:
        try:
            written = merge_shards(output, schema, settings, about)
        finally:
            (parts_folder(output.path) / MERGE_CLAIM).unlink(missing_ok=True)
        print(f"wrote {output.path} ({written['rows']:,} rows; {describe_counts(written)})")
        return
    done = f"shard {output.shard} done ({shard_rows:,} rows)"
    if output.torchrun:
        print(f"{done}; rank 0 writes {output.path}")
    elif all_done:
        claim = parts_folder(output.path) / MERGE_CLAIM
        print(f"{done}; another process is writing {output.path} (if none is, delete {claim} and rerun)")
    else:
        print(f"{done}; the last of the {output.shard.count} shards to finish writes {output.path}")


def describe_counts(about: dict[str, Any]) -> str:
    flags = about["flags"]
    return (f"{flags.get('unlike-training', 0):,} flagged unlike-training, {flags.get('uncertain', 0):,} "
            f"uncertain, {about['unreadable']:,} unreadable")


def write_predictions(
    output: Output, rows: Iterable[Row], classify: Classify, schema: pa.Schema, settings: dict[str, Any],
    id_column: str | None = None, about: dict[str, Any] | None = None,
) -> bool:
    """Classify this process's shard of `rows` and write a record per row to its shard folder, durably a
    chunk at a time (with output.resume, skipping the rows an earlier run wrote), then merge the shards into
    the output file where this process is the one to, with `about` (what the run says of itself) as its
    metadata. Returns False when Ctrl-C stopped it: what was written is kept for --resume."""
    writer = ShardWriter(output, schema, settings)
    try:
        remaining = output.shard.select(rows, writer.rows_before)
        for row, result in classify(remaining, writer.rows_before):
            writer.add(output_record(row, result, id_column))
        finish_output(output, writer.finish(), schema, settings, about or {})
    except KeyboardInterrupt:
        print(f"interrupted: the {writer.rows:,} rows written are kept: add --resume to continue",
              file=sys.stderr)
        return False
    finally:
        writer.close()
    return True
