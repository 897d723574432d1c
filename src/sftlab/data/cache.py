"""The prepared-data cache: where preparation writes its Arrow files, and how a later run finds them.

An entry is a directory named by a hash of the source files' contents, the data config,
the preparation settings and the tokenizer (`~/.cache/sftlab/prepared/KEY`, or under
`SFTLAB_CACHE_DIR`). Preparation writes everything into `KEY.partial-PID` and renames it
into place when done, so an entry is complete or absent, never half-written; training then
reads the tokenized rows memory-mapped from the entry, without copying them.

    manifest.json        the Arrow files of each split, and the source labels
    train*.arrow         input_ids, assistant_masks and the per-row counts of the audit
    eval*.arrow          the same for the eval rows
    eval_examples*.arrow the normalized eval examples, read on demand (formats.ExampleSequence)
    train_sample.jsonl   a seeded sample of normalized training examples
    audit.json           what `sftlab check` shows

Trade-offs:
- Hashing the source files costs a read of each (about a second per GB) at every run;
  comparing sizes and times would be faster but would miss an edited file of equal size.
- With `SFTLAB_NO_CACHE=1` (or no cache directory) the files go to a temporary directory
  that lives as long as the process, since the returned datasets are memory-mapped from it.
- TRL's own preparation maps (labels, truncation) write their outputs next to the
  dataset's files, so they land in the entry too and are reused by the next run.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from sftlab.config import DataConfig, SourceConfig, cache_root
from sftlab.data.formats import Example, ExampleSequence
from sftlab.data.sources import source_list
from sftlab.rundir import AUDIT_FILE

CACHE_VERSION = "4"  # 4: masks for real templates (issue 16), the `stops` column
MANIFEST = "manifest.json"
TRAINER_COLUMNS = ["input_ids", "assistant_masks"]


def default_cache_dir() -> Path | None:
    root = cache_root()
    return None if root is None else root / "prepared"


def cache_key(cfg: DataConfig, tokenizer, assistant_only_loss: bool, seed: int, max_length: int | None) -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            [CACHE_VERSION, cfg.model_dump(mode="json"), assistant_only_loss, seed, max_length], sort_keys=True
        ).encode()
    )
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    for source in source_list(cfg.train) + source_list(cfg.eval):
        digest.update(_source_fingerprint(source).encode())
    return digest.hexdigest()[:32]


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((vocabulary + str(tokenizer.chat_template) + str(tokenizer.eos_token)).encode()).hexdigest()


def _source_fingerprint(source: SourceConfig) -> str:
    path = Path(source.path).expanduser()
    if path.is_file():
        return _file_hash(path)
    if path.is_dir():
        return "".join(_file_hash(p) for p in sorted(path.rglob("*")) if p.is_file())
    return f"hub:{source.path}:{source.name}:{source.split}"  # hub data is versioned by its own cache


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# =========================================================================== entries


def work_directory(cache_dir: Path | None, key: str) -> Path:
    """An empty directory to prepare into: beside the entry it will become, or a temporary one."""
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            partial = cache_dir / f"{key}.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)  # left by a killed run that had this process id
            partial.mkdir()
            return partial
        except OSError:
            pass  # a cache that cannot be written costs time, not correctness
    directory = Path(tempfile.mkdtemp(prefix="sftlab-prepared-"))
    atexit.register(shutil.rmtree, directory, True)
    return directory


def write_entry(
    directory: Path, files: dict[str, list[str] | None], labels: list[str], audit: dict, train_sample: list[Example]
) -> None:
    """The small files of an entry; the Arrow files named in `files` are already in `directory`."""
    names = {split: None if paths is None else [Path(path).name for path in paths] for split, paths in files.items()}
    kept = {name for paths in names.values() if paths for name in paths}
    for path in directory.iterdir():
        if path.suffix == ".arrow" and path.name not in kept:
            path.unlink()  # records and normalized rows: not needed once tokenized
    (directory / "train_sample.jsonl").write_text(
        "".join(json.dumps(asdict(example), default=str) + "\n" for example in train_sample), encoding="utf-8"
    )
    (directory / AUDIT_FILE).write_text(json.dumps(audit), encoding="utf-8")
    (directory / MANIFEST).write_text(json.dumps({"files": names, "labels": labels}), encoding="utf-8")


def publish(work: Path, cache_dir: Path | None, key: str) -> Path:
    """Move a finished work directory into the cache; where it cannot go, it is used where it is."""
    if cache_dir is None or work.parent != cache_dir:
        return work
    final = cache_dir / key
    try:
        work.rename(final)  # complete or absent: a killed run never leaves half an entry
    except OSError:
        if not (final / MANIFEST).exists():
            return work  # cannot be renamed (and no other process wrote it): use it from here
        shutil.rmtree(work, ignore_errors=True)  # another process prepared the same data first
    return final


def load_entry(directory: Path):
    """The PreparedData of a finished entry, memory-mapped; None when there is none (or it is damaged)."""
    if not (directory / MANIFEST).exists():
        return None
    import datasets

    from sftlab.data.prepare import PreparedData

    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        files, labels = manifest["files"], manifest["labels"]
        train = _open(directory, files["train"], TRAINER_COLUMNS)
        evaluation = _open(directory, files["eval"], TRAINER_COLUMNS) if files.get("eval") else None
        examples = (
            ExampleSequence(_open(directory, files["eval_examples"]), labels) if files.get("eval_examples") else []
        )
        lines = (directory / "train_sample.jsonl").read_text(encoding="utf-8").splitlines()
        sample = [Example(**json.loads(line)) for line in lines]
        audit = json.loads((directory / AUDIT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError, datasets.exceptions.DatasetsError):
        return None
    return PreparedData(train=train, eval=evaluation, eval_examples=examples, audit=audit, train_sample=sample)


def _open(directory: Path, names: list[str], columns: list[str] | None = None):
    """A memory-mapped datasets.Dataset over an entry's Arrow files.

    Built from its tables with a fingerprint of its own: `Dataset.from_file` would hash
    each file's path and schema again (tens of milliseconds a call, for every small run)."""
    import datasets
    from datasets.table import MemoryMappedTable, concat_tables

    tables = [MemoryMappedTable.from_file(str(directory / name)) for name in names]
    table = tables[0] if len(tables) == 1 else concat_tables(tables)
    if columns is not None:
        table = table.select(columns)
    fingerprint = hashlib.sha256(json.dumps([str(directory), names, columns]).encode()).hexdigest()[:32]
    return datasets.Dataset(table, fingerprint=fingerprint)
