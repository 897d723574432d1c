"""Arrow files of the data stage: write in bounded batches, read memory-mapped, map a function over them.

Every stage of the preparation reads Arrow files and writes Arrow files (the IPC stream
format that `datasets` uses, so `datasets.Dataset.from_file` opens any of them). A
stage's function takes a batch of rows as Python lists and returns the output batch.

- Large inputs go through `datasets.Dataset.map` with one process per core: it shards the
  file, runs the function in worker processes and writes one output file per shard.
- Small inputs (tests, a quick check) run the same function in this process, straight
  over the Arrow table: starting workers, or `map`'s own set-up (some 25 ms a call),
  would cost more than the work.

Trade-off: selecting rows (after de-duplication and splitting) copies them into a new
file, in chunks, instead of keeping an index over the old one: one sequential write of
the normalized text, after which every stage reads contiguous, memory-mapped files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

TAKE_CHUNK = 10_000  # rows copied at a time when selecting: memory stays bounded by one chunk


def read_table(paths: list[str] | list[Path]):
    """The rows of Arrow stream files as one table, memory-mapped (nothing is read until used)."""
    import pyarrow as pa

    tables = [pa.ipc.open_stream(pa.memory_map(str(path))).read_all() for path in paths]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


class StreamWriter:
    """Writes record batches or tables to an Arrow stream file with a fixed schema."""

    def __init__(self, path: Path, schema):
        import pyarrow as pa

        self.path, self.schema = path, schema
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, schema)

    def write(self, table) -> None:
        if table.num_rows:
            self.writer.write_table(table.cast(self.schema) if table.schema != self.schema else table)

    def close(self) -> None:
        self.writer.close()
        self.sink.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def iter_tables(path: Path | str, batch_size: int):
    """The rows of an Arrow stream file in tables of at most `batch_size` rows, read (not memory-mapped):
    each batch's memory is released once the next is read, so a long file costs one batch."""
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as handle:
        for batch in pa.ipc.open_stream(handle):
            for start in range(0, batch.num_rows, batch_size):
                yield pa.Table.from_batches([batch.slice(start, batch_size)])


def write_taken(paths: list[str], indices, path: Path) -> Path:
    """Copy the rows at `indices` (positions in the files' rows, in that order) to a new file.

    A chunk at a time, each from a fresh memory map: the pages a chunk reads are released
    with its map, so copying a large file does not leave all of it resident in this process."""
    import pyarrow as pa

    with StreamWriter(path, read_table(paths).schema) as writer:
        for start in range(0, len(indices), TAKE_CHUNK):
            writer.write(read_table(paths).take(pa.array(indices[start : start + TAKE_CHUNK])))
    return path


def write_filtered(paths: list[str], keep, path: Path) -> Path:
    """Copy the rows where `keep` (a numpy bool array) is set to a new file, a chunk at a time."""
    import numpy as np

    return write_taken(paths, np.flatnonzero(keep), path)


def apply(
    source,
    function: Callable,
    output: Path,
    features,
    fn_kwargs: dict[str, Any],
    batch_size: int,
    processes: int | None,
    fingerprint: str,
    description: str,
    with_indices: bool = False,
    with_rank: bool = False,
) -> list[str]:
    """Run a batched function over every row of `source` (an Arrow file's path, or a datasets.Dataset);
    returns the output files, in row order."""
    import datasets

    if processes:
        dataset = datasets.Dataset.from_file(str(source)) if isinstance(source, (str, Path)) else source
        result = dataset.map(
            function,
            batched=True,
            batch_size=batch_size,
            with_indices=with_indices,
            with_rank=with_rank,
            remove_columns=dataset.column_names,
            features=features,
            fn_kwargs=fn_kwargs,
            num_proc=processes,
            cache_file_name=str(output),
            load_from_cache_file=False,
            new_fingerprint=fingerprint,
            desc=description,
        )
        return [entry["filename"] for entry in result.cache_files]
    schema = _schema(features)
    if isinstance(source, (str, Path)):
        batches = (table.to_pydict() for table in iter_tables(source, batch_size))
    else:  # a datasets.Dataset's rows go through its formatting (it decodes its feature types)
        batches = (source[start : start + batch_size] for start in range(0, len(source), batch_size))
    with StreamWriter(output, schema) as writer:
        start = 0
        for batch in batches:
            rows = len(next(iter(batch.values()), []))
            extra = ([list(range(start, start + rows))] if with_indices else []) + ([None] if with_rank else [])
            out = function(batch, *extra, **fn_kwargs)  # rank None: not a worker process
            writer.write(out if not isinstance(out, dict) else _table(out, schema))
            start += rows
    return [str(output)]


_SCHEMAS: dict[int, Any] = {}


def _schema(features):
    # Features.arrow_schema makes a deep copy each time it is asked for; the stage's Features are made once.
    if id(features) not in _SCHEMAS:
        _SCHEMAS[id(features)] = (features, features.arrow_schema)
    return _SCHEMAS[id(features)][1]


def _table(columns: dict[str, list], schema):
    import pyarrow as pa

    return pa.Table.from_pydict(columns, schema=schema)
