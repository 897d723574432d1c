"""Sources: files, save_to_disk directories and hub datasets, read into Arrow record files.

A source becomes a `Records`: a memory-mapped `datasets.Dataset` of its rows, each of which
can be traced to its file and line, so that every problem found later names them.

- JSON Lines, JSON and CSV/TSV files (plain, `.gz` or `.zst`) are streamed by sftlab's own
  readers into an Arrow file of (line, raw JSON bytes): `load_dataset("json")` would stop
  at the first malformed line, infer one schema for rows of any shape, and forget which
  line a row came from. Decoding and parsing each line happens later, in parallel, in the
  normalizing map (`parse_json_record`), so a bad line is a problem with its line number,
  never a crash. A `.json` array is one document: it is parsed whole (use JSON Lines for
  data larger than memory).
- Parquet files are copied batch by batch into an Arrow file with their own columns;
  save_to_disk directories and hub datasets are already Arrow (memory-mapped from disk or
  the hub cache) and are used as they are. Their "line" is the 1-based row number.

Trade-off: every file source is written once more to disk (about its own size) so that the
parallel stages read it memory-mapped; memory stays bounded by one batch of lines.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sftlab.config import SourceConfig
from sftlab.errors import BadRow, DataError

DATA_SUFFIXES = {".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
FILE_SUFFIXES = DATA_SUFFIXES | set(COMPRESSIONS)  # what a data file's name ends with
EVAL_SPLIT_NAMES = ("test", "validation", "valid", "eval", "dev")
BOM = b"\xef\xbb\xbf"
BATCH_ROWS = 10_000  # records written per Arrow batch
BATCH_BYTES = 32 << 20  # ... or fewer, when they hold this much text: memory stays flat whatever the file
MAX_PROBLEMS_LISTED = 10_000  # problems kept with their file and line; `dropped` counts every one
SUPPORTED = ".jsonl, .json, .csv, .tsv, .parquet (the first four also as .gz or .zst), or a save_to_disk directory"


@dataclass
class Record:
    """One raw row and where it came from, so every problem can name its file and line."""

    data: dict[str, Any]
    source: str
    line: int  # 1-based line for text files, 1-based row number otherwise


@dataclass
class Problem:
    file: str
    line: int
    message: str


class Collector:
    """Gathers problems and drop reasons; raises at the first one when on_error is fail."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.problems: list[Problem] = []
        self.dropped: dict[str, int] = {}

    def bad_row(self, file: str, line: int, message: str) -> None:
        if self.on_error == "fail":
            raise DataError(
                f"{file}:{line}: {message}", hint="fix the row, or set data.on_error: skip to drop bad rows"
            )
        if len(self.problems) < MAX_PROBLEMS_LISTED:
            self.problems.append(Problem(file, line, message))
        self.drop(reason_category(message))

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count


def reason_category(message: str) -> str:
    """'missing field 'x' (has a, b)' -> 'missing field': counts group by kind, not by detail."""
    return re.split(r" [('\"\d]|:", message, maxsplit=1)[0]


@dataclass
class Records:
    """A source's rows on disk. `raw`: columns `line` and `raw` (one JSON record's bytes, parsed
    later); otherwise the source's own columns, the line being the row number."""

    label: str
    data: Any  # the Path of an Arrow file (file sources), or a datasets.Dataset (saved and hub datasets)
    rows: int
    raw: bool
    own_eval: Records | None = None  # the dataset's own test/validation split

    def batch(self, start: int, stop: int) -> dict[str, list]:
        if isinstance(self.data, Path):
            from sftlab.data.arrowio import read_table

            return read_table([self.data]).slice(start, stop - start).to_pydict()
        return self.data[start:stop]


def _dataset_records(label: str, dataset, own_eval: Records | None = None) -> Records:
    dataset = dataset.with_format(None)  # rows as Python objects, whatever it was saved as
    return Records(label, dataset, len(dataset), raw=False, own_eval=own_eval)


def source_list(spec) -> list[SourceConfig]:
    if spec is None:
        return []
    items = spec if isinstance(spec, list) else [spec]
    return [SourceConfig(path=item) if isinstance(item, str) else item for item in items]


def read_source(source: SourceConfig, collector: Collector, workdir: Path) -> Records:
    path = Path(source.path).expanduser()
    if path.is_dir() and _written_by_save_to_disk(path):
        return _read_saved_dataset(path, source)
    if path.is_dir():
        return _read_hub_dataset(source)  # a dataset repository on disk loads like one on the hub
    if path.is_file():
        return _read_file(path, collector, workdir)
    if source.path.startswith((".", "/", "~")) or path.suffix.lower() in FILE_SUFFIXES or source.path.count("/") > 1:
        raise DataError(
            f"data file not found: {source.path}", hint="relative paths start from the directory you run sftlab in"
        )
    return _read_hub_dataset(source)


def file_kind(path: Path) -> tuple[str, str | None]:
    """('.jsonl', 'gzip') for data.jsonl.gz; ('.csv', None) for data.csv."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), compression


# =========================================================================== files


def _read_file(path: Path, collector: Collector, workdir: Path) -> Records:
    kind, compression = file_kind(path)
    if kind not in DATA_SUFFIXES or (kind == ".parquet" and compression):
        shown = "".join(path.suffixes[-2:]) if compression else path.suffix
        raise DataError(f"{path}: unsupported file type {shown or '(none)'}", hint=f"use {SUPPORTED}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty", hint="point data.train/data.eval at a file with rows")
    target = workdir / f"records-{len(list(workdir.glob('records-*.arrow')))}.arrow"
    if kind == ".parquet":
        return Records(str(path), target, _copy_parquet(path, target), raw=False)
    opener = _opener(path, compression)
    with _RecordWriter(target) as writer:
        try:
            if kind in (".jsonl", ".ndjson"):
                _write_jsonl(opener, writer)
            elif kind == ".json":
                _write_json_document(path, opener, writer, collector)
            else:
                _write_delimited(path, opener, writer, collector, "\t" if kind == ".tsv" else ",")
        except _decompression_errors() as exc:  # a damaged or truncated compressed file
            raise DataError(
                f"{path}: cannot read the {compression or 'file'} data: {exc}",
                hint="check that the file is complete (re-download or re-compress it)",
            ) from None
    return Records(str(path), target, writer.count, raw=True)


def _opener(path: Path, compression: str | None) -> Callable[[], BinaryIO]:
    if compression == "gzip":
        import gzip

        return lambda: gzip.open(path, "rb")
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:  # pragma: no cover - a dependency of sftlab
            raise DataError(
                f"{path}: reading .zst files needs the zstandard package", hint="pip install zstandard"
            ) from None
        # Buffered: the decompressing reader itself cannot iterate lines.
        return lambda: io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True))
    return lambda: path.open("rb")


def _decompression_errors() -> tuple[type[Exception], ...]:
    import zlib

    errors: tuple[type[Exception], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:  # pragma: no cover
        pass
    return errors


class _RecordWriter:
    """Writes (line, raw) records to an Arrow stream file in bounded batches."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.pa, self.path = pa, path
        self.schema = pa.schema([("line", pa.int64()), ("raw", pa.binary())])
        self.lines: list[int] = []
        self.raws: list[bytes] = []
        self.size = self.count = 0

    def __enter__(self):
        self.sink = self.pa.OSFile(str(self.path), "wb")
        self.writer = self.pa.ipc.new_stream(self.sink, self.schema)
        return self

    def add(self, line: int, raw: bytes) -> None:
        self.lines.append(line)
        self.raws.append(raw)
        self.size += len(raw)
        self.count += 1
        if len(self.lines) >= BATCH_ROWS or self.size >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            batch = self.pa.record_batch(
                [self.pa.array(self.lines, self.pa.int64()), self.pa.array(self.raws, self.pa.binary())],
                schema=self.schema,
            )
            self.writer.write_batch(batch)
        self.lines, self.raws, self.size = [], [], 0

    def __exit__(self, *exc_info):
        try:
            if exc_info[0] is None:
                self.flush()
        finally:
            self.writer.close()
            self.sink.close()


def _write_jsonl(opener, writer: _RecordWriter) -> None:
    # Binary lines split on b"\n" only: U+2028 and friends inside a string are text, not line ends.
    with opener() as handle:
        for number, line in enumerate(handle, start=1):
            if number == 1:
                line = line.removeprefix(BOM)  # a BOM is not part of the first record
            if line.strip():
                writer.add(number, line.rstrip(b"\n"))


def parse_json_record(raw: bytes) -> dict | None:
    """One JSON Lines record; None for a blank line. Raises BadRow naming what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRow(f"invalid UTF-8 (byte {exc.start} of the line)") from None
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRow(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise BadRow("invalid JSON: nested too deeply") from None
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object, got {type(row).__name__}")
    return row


def _read_whole_text(path: Path, opener) -> str:
    with opener() as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8", hint="re-save the file as UTF-8") from None


def _write_json_document(path: Path, opener, writer: _RecordWriter, collector: Collector) -> None:
    try:
        document = json.loads(_read_whole_text(path, opener))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: invalid JSON: {exc.msg}",
            hint="a .json file holds one array of records; use .jsonl for one record per line",
        ) from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON: nested too deeply") from None
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected an array of records, or an object holding exactly one list",
                hint=f"this object has {len(lists)} lists",
            )
        document = lists[0]
    if not isinstance(document, list):
        raise DataError(f"{path}: expected an array of records, got {type(document).__name__}")
    for number, row in enumerate(document, start=1):
        if not isinstance(row, dict):
            collector.bad_row(str(path), number, f"record {number} is not an object")
            continue
        try:
            writer.add(number, json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        except RecursionError:
            collector.bad_row(str(path), number, "invalid JSON: nested too deeply")


def _write_delimited(path: Path, opener, writer: _RecordWriter, collector: Collector, delimiter: str) -> None:
    csv.field_size_limit(sys.maxsize)  # long responses are data; size is checked per example instead
    with opener() as handle:
        # newline="" leaves line breaks to the csv module: splitting lines first would also break
        # rows at U+2028, form feeds and other characters that csv.writer does not quote.
        text = io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")
        reader = csv.DictReader(text, delimiter=delimiter)
        try:
            if not reader.fieldnames:
                raise DataError(f"{path}: no header row")
            for row in reader:
                if None in row:
                    collector.bad_row(str(path), reader.line_num, "more fields than the header has")
                    continue
                # csv yields None for missing trailing fields: that is a missing value, not text.
                record = {key: value for key, value in row.items() if value is not None}
                writer.add(reader.line_num, json.dumps(record, ensure_ascii=False).encode("utf-8"))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
        except UnicodeDecodeError:
            raise DataError(
                f"{path}:{_first_invalid_utf8_line(opener)}: invalid UTF-8", hint="re-save the file as UTF-8"
            ) from None


def _first_invalid_utf8_line(opener) -> int:
    """The line of the first byte that is not UTF-8, read again in chunks (only when there is one)."""
    import codecs

    decoder, lines = codecs.getincrementaldecoder("utf-8")(), 1
    with opener() as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return lines + chunk[: max(exc.start, 0)].count(b"\n")
            lines += chunk.count(b"\n")
    return lines


def _copy_parquet(path: Path, target: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, parquet.schema_arrow) as writer:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
                writer.write_batch(batch)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read Parquet: {exc}") from None
    return parquet.metadata.num_rows


# =========================================================================== Arrow datasets


def _written_by_save_to_disk(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _split_dataset_dict(loaded, label: str, source: SourceConfig) -> Records:
    """Pick the train split of a DatasetDict, and its own eval split when it has one."""
    if source.split:
        if source.split not in loaded:
            raise DataError(
                f"{label}: no split {source.split!r} (has {', '.join(loaded)})", hint="set the source's split"
            )
        return _dataset_records(f"{label}[{source.split}]", loaded[source.split])
    train_name = "train" if "train" in loaded else next(iter(loaded))
    eval_name = next((name for name in EVAL_SPLIT_NAMES if name in loaded and name != train_name), None)
    own_eval = _dataset_records(f"{label}[{eval_name}]", loaded[eval_name]) if eval_name else None
    return _dataset_records(f"{label}[{train_name}]", loaded[train_name], own_eval)


def _read_saved_dataset(path: Path, source: SourceConfig) -> Records:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(
            f"{path}: not a directory written by datasets' save_to_disk ({str(exc).splitlines()[0]})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return _split_dataset_dict(loaded, str(path), source)
    return _dataset_records(str(path), loaded)


def _read_hub_dataset(source: SourceConfig) -> Records:
    """A hub dataset through `load_dataset`: downloaded once into the hub cache as Arrow, then memory-mapped."""
    import datasets

    try:
        # Only the asked-for split when there is one: hub datasets can be large.
        loaded = datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as exc:  # the hub client raises many types: offline, missing repo, missing config...
        raise DataError(
            f"cannot load dataset {source.path!r} (config {source.name}): {str(exc).strip().splitlines()[0]}",
            hint="check the path or hub id; with HF_HUB_OFFLINE=1 only cached datasets load",
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return _split_dataset_dict(loaded, source.path, source)
    return _dataset_records(f"{source.path}[{source.split}]", loaded)
