"""The data stage: sources -> normalized examples -> de-duplicated, split, mixed -> tokenized, audited, cached.

    read each source into Arrow records                          (sources.py)
    normalize them, in parallel: one row per record              (formats.normalize_batch)
    drop exact and near duplicates, and train rows also in eval  (hashes, numpy)
    carve a seeded eval split if none was given; mix by weight   (index arrays, numpy)
    render and tokenize the chosen rows, in parallel             (masks.tokenize_batch)
    audit the per-row counts; write the cache entry              (audit.py, cache.py)

Every stage streams through Arrow files on disk: `datasets.map` reads memory-mapped
batches and writes its output in batches, in up to one process per core. What is held in
memory for the whole dataset is a few numpy integers a row (hashes, indices, counts),
never the rows' text or tokens, so memory stays flat as the data grows.

Trade-offs:
- Order is decided on index arrays: the training rows keep the sources' order (the
  trainer shuffles them by its seed); the eval split is a seeded permutation. The same
  seed gives the same rows in the same order, so a resumed run sees the same data.
- Rows are tokenized after de-duplication and splitting, so work is spent only on rows
  that are used, and a source with `weight: 2` is tokenized twice (simplest, and rare).
- Small data (tests, quick checks) is processed in this process: starting workers would
  cost more than it saves.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftlab.config import DataConfig
from sftlab.data import arrowio
from sftlab.data import audit as audits
from sftlab.data.cache import cache_key, default_cache_dir, load_entry, publish, work_directory, write_entry
from sftlab.data.formats import (
    BAD_EXAMPLE,
    USABLE,
    Example,
    batch_examples,
    check_template,
    detect_format,
    normalize_batch,
    normalized_features,
    sample_columns,
)
from sftlab.data.masks import tokenize_batch, tokenized_features
from sftlab.data.sources import Collector, Records, read_source, source_list
from sftlab.errors import DataError
from sftlab.templates import NEEDS_TOOLS, stop_token_ids

TRAIN_SAMPLE_SIZE = 64  # training examples kept as Examples: few-shot prompts for the prompted baseline (evaluate.py)
NORMALIZE_ROWS_PER_PROCESS = 20_000  # normalizing is cheap: a worker pays off from this many rows
TOKENIZE_ROWS_PER_PROCESS = 2_000  # tokenizing is not
NORMALIZE_BATCH = 1000
TOKENIZE_BATCH = 256  # rows rendered and tokenized together: bounds the Python objects a worker holds
DUPLICATE_EXAMPLES = 5  # duplicates shown in the audit with both lines


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset: input_ids, assistant_masks (memory-mapped)
    eval: Any | None
    # The normalized eval examples, in the order of the eval rows (an example can make several
    # rows, or none when the template rejects it). Read on demand from Arrow: index, slice or
    # iterate it; evaluation reads only its first eval.num_prompts, the monitor a few.
    eval_examples: Sequence[Example]
    audit: dict[str, Any]
    # A seeded sample of normalized training examples (never eval rows), in the order drawn.
    train_sample: list[Example] = field(default_factory=list)


def preparation_settings(training: dict[str, Any]) -> dict[str, Any]:
    """What a run's `training` section decides about its data: the loss masks, the seed of the
    eval split and the mixing, the cut. Training and evaluation prepare data with the same."""
    return {
        "assistant_only_loss": bool(training.get("assistant_only_loss", True)),
        "seed": training.get("seed", 42),
        "max_length": training.get("max_length"),
    }


def prepare_data(
    cfg: DataConfig,
    tokenizer,
    assistant_only_loss: bool = True,
    seed: int = 42,
    max_length: int | None = None,
    cache_dir: Path | None = None,
) -> PreparedData:
    """Load, audit, split and tokenize train and eval data. Raises DataError when training cannot go ahead."""
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    key = cache_key(cfg, tokenizer, assistant_only_loss, seed, max_length)
    if cache_dir and (cached := load_entry(cache_dir / key)) is not None:
        cached.audit["cached"] = True
        return cached
    work = work_directory(cache_dir, key)
    try:
        _Preparation(cfg, tokenizer, assistant_only_loss, seed, max_length, work, key).run()
    except BaseException:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        raise
    prepared = load_entry(publish(work, cache_dir, key))
    if prepared is None:  # pragma: no cover - the entry was just written
        raise DataError(f"the prepared data in {work} cannot be read back", hint="check the disk (free space?)")
    return prepared


@dataclass
class _Rows:
    """Normalized rows of one or more sources (Arrow files), and numpy arrays over the usable ones."""

    files: list[str]  # Arrow files of normalized rows (formats.normalized_features), in order
    usable: Any  # positions of the usable rows in the files' rows
    exact: Any  # their exact and near-exact key hashes
    near: Any
    sources: list[tuple[Any, tuple[int, int]]] = field(default_factory=list)  # (SourceConfig, range in `usable`)


class _Preparation:
    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        assistant_only_loss: bool,
        seed: int,
        max_length: int | None,
        work: Path,
        key: str,
    ):
        self.cfg, self.tokenizer, self.assistant_only_loss = cfg, tokenizer, assistant_only_loss
        self.seed, self.max_length, self.work, self.key = seed, max_length, work, key
        self.collector = Collector(cfg.on_error)
        self.formats: dict[str, str] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.labels: list[str] = []
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def run(self) -> None:
        import numpy as np

        # 1. Read and normalize every source; a source's own test split becomes eval data.
        train_parts, own_eval = [], []
        for source in source_list(self.cfg.train):
            records = read_source(source, self.collector, self.work)
            train_parts.append((source, self._normalize(records)))
            if records.own_eval is not None:
                own_eval.append((None, self._normalize(records.own_eval, " (its eval split)")))
        eval_parts = [
            (None, self._normalize(read_source(s, self.collector, self.work))) for s in source_list(self.cfg.eval)
        ]
        train = _combine(train_parts)
        evaluation = _combine(eval_parts if self.cfg.eval else own_eval)

        # 2. Duplicates and leakage: each example once, and never in both train and eval.
        duplicates = {"exact": 0, "near": 0, "examples": []}
        train_kept = self._dedup(train, duplicates)
        eval_kept = self._dedup(evaluation, duplicates) if evaluation else np.zeros(0, np.int64)
        leaked = 0
        if len(eval_kept):
            in_eval = np.isin(train.near[train_kept], evaluation.near[eval_kept])
            leaked = int(in_eval.sum())
            train_kept = train_kept[~in_eval]
        if leaked:
            self.collector.drop("also in eval (leakage)", leaked)

        # 3. A seeded eval split when no eval data was given, after de-duplication.
        rng = np.random.default_rng(self.seed)
        if not len(eval_kept) and self.cfg.eval_split > 0:
            held_out = max(1, round(len(train_kept) * self.cfg.eval_split)) if len(train_kept) > 1 else 0
            order = rng.permutation(len(train_kept))
            eval_kept, evaluation = train_kept[order[:held_out]], train
            train_kept = np.sort(train_kept[order[held_out:]])

        # 4. Mix sources by weight (fraction < 1 samples, weight > 1 repeats).
        train_order = self._weighted(train, train_kept, rng)
        if not len(train_order):
            raise DataError("no usable training rows", hint=_why_empty(self.collector))
        train_examples = arrowio.write_taken(train.files, train.usable[train_order], self.work / "train-examples.arrow")
        eval_examples = None
        if len(eval_kept):
            eval_examples = arrowio.write_taken(
                evaluation.files, evaluation.usable[eval_kept], self.work / "eval-examples.arrow"
            )
        sample = random.Random(self.seed).sample(range(len(train_order)), min(TRAIN_SAMPLE_SIZE, len(train_order)))
        sampled = arrowio.read_table(train.files).take(train.usable[train_order[sample]])
        train_sample = batch_examples(sampled.to_pydict(), self.labels)

        # 5. Render with the chat template and tokenize: exactly what the trainer receives.
        stops = stop_token_ids(self.tokenizer)
        train_files, train_counts, first = self._tokenize(train_examples, len(train_order), "train", stops)
        if not train_counts.rows:
            raise DataError(
                "no training row could be rendered with the model's chat template", hint=_why_empty(self.collector)
            )
        eval_files, eval_counts = None, None
        if eval_examples is not None:
            eval_files, eval_counts, _ = self._tokenize(eval_examples, len(eval_kept), "eval", stops)

        shown = [
            audits.marked_example(self.tokenizer, self.labels[source], line, ids, mask)
            for source, line, ids, mask in zip(
                first["source"], first["line"], first["input_ids"], first["assistant_masks"]
            )
        ]
        audit = audits.build_audit(
            train_counts,
            eval_counts.rows if eval_counts else 0,
            eval_counts.tokens if eval_counts else 0,
            shown,
            self.formats,
            self.counts,
            self.collector,
            duplicates,
            leaked,
            self.max_length,
            self.cfg,
            self.assistant_only_loss,
            stop_tokens=[self.tokenizer.decode([stop]) for stop in stops],
        )
        files = {
            "train": train_files,
            "eval": eval_files,
            "eval_examples": [str(eval_examples)] if eval_examples is not None else None,
        }
        write_entry(self.work, files, self.labels, audit, train_sample)

    # ----------------------------------------------------------------------- stages

    def _normalize(self, records: Records, suffix: str = "") -> _Rows:
        """A source's records -> normalized rows; problems go to the collector (in line order)."""
        import numpy as np

        label = records.label + suffix
        source_id = len(self.labels)
        self.labels.append(records.label)
        if not records.rows:
            if not (self.collector.problems or self.collector.dropped):
                raise DataError(f"{label}: no rows", hint="the file holds no records")
            empty = arrowio.StreamWriter(
                self.work / f"normalized-{source_id}.arrow", normalized_features().arrow_schema
            )
            empty.close()
            return _Rows([str(empty.path)], *(np.zeros(0, np.int64) for _ in range(3)))
        fmt = self.cfg.format or ("template" if self.cfg.template else None)
        if fmt is None:
            columns, first_line = sample_columns(records, self.cfg.max_example_chars)
            fmt = detect_format(columns) if columns else "text"  # no usable row: every row is a problem anyway
            if fmt is None:
                raise DataError(
                    f"{records.label}:{first_line}: cannot tell the data format from the columns "
                    f"({', '.join(sorted(map(str, columns)))})",
                    hint="set data.format (messages, sharegpt, alpaca, prompt_completion, text) or data.template",
                )
        if fmt == "template":
            check_template(self.cfg.template)
        files = arrowio.apply(
            records.data,
            normalize_batch,
            self.work / f"normalized-{source_id}.arrow",
            normalized_features(),
            {
                "raw": records.raw,
                "fmt": fmt,
                "template": self.cfg.template,
                "max_chars": self.cfg.max_example_chars,
                "label": records.label,
                "source_id": source_id,
            },
            batch_size=NORMALIZE_BATCH,
            processes=self._processes(records.rows, NORMALIZE_ROWS_PER_PROCESS),
            fingerprint=self._fingerprint(f"normalized-{source_id}"),
            description=f"Normalizing {label}",
            with_indices=True,
        )
        table = arrowio.read_table(files)
        status = table.column("status").to_numpy()
        for line, problem in _problems(table, status != USABLE):
            self.collector.bad_row(records.label, line, problem)
        rows = int(((status == USABLE) | (status == BAD_EXAMPLE)).sum())  # records that could be read
        usable = np.flatnonzero(status == USABLE)
        if not rows and not (self.collector.problems or self.collector.dropped):
            raise DataError(f"{label}: no rows", hint="the file holds no records")
        if rows:
            self.formats[label] = fmt
            self.counts[label] = {"rows": rows, "usable": len(usable)}
        return _Rows(files, usable, table.column("exact").to_numpy()[usable], table.column("near").to_numpy()[usable])

    def _dedup(self, rows: _Rows, duplicates: dict) -> Any:
        """Positions (into rows.usable) of the first example of each near-exact key, in order."""
        import numpy as np

        everything = np.arange(len(rows.usable))
        if not self.cfg.dedup or not len(everything):
            return everything
        _, first_index, inverse = np.unique(rows.near, return_index=True, return_inverse=True)
        first = first_index[inverse]
        again = np.flatnonzero(first != everything)
        exact = rows.exact[again] == rows.exact[first[again]]  # the same exact text as the example kept
        duplicates["exact"] += int(exact.sum())
        duplicates["near"] += int((~exact).sum())
        kinds = [("exact duplicate", int(exact.sum())), ("near duplicate", int((~exact).sum()))]
        for kind, count in kinds if not len(exact) or exact[0] else kinds[::-1]:  # in the order first seen
            if count:
                self.collector.drop(kind, count)
        for position, is_exact in zip(again[:DUPLICATE_EXAMPLES], exact[:DUPLICATE_EXAMPLES]):
            if len(duplicates["examples"]) < DUPLICATE_EXAMPLES:
                duplicates["examples"].append(
                    {
                        "kind": "exact" if is_exact else "near",
                        "first": self._where(rows, first[position]),
                        "again": self._where(rows, position),
                    }
                )
        return np.flatnonzero(first == everything)

    def _where(self, rows: _Rows, position) -> str:
        row = (
            arrowio.read_table(rows.files)
            .select(["source", "line"])
            .slice(int(rows.usable[position]), 1)
            .to_pylist()[0]
        )
        return f"{self.labels[row['source']]}:{row['line']}"

    def _weighted(self, rows: _Rows, kept, rng) -> Any:
        """The training positions (into rows.usable), source by source in order, each drawn by its weight."""
        import numpy as np

        parts = []
        for source, (start, stop) in rows.sources:
            mine = kept[(kept >= start) & (kept < stop)]
            weight = 1 if source is None or source.weight is None else source.weight
            whole, part = int(weight), weight - int(weight)
            parts += [np.tile(mine, whole), rng.choice(mine, round(len(mine) * part), replace=False)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def _tokenize(self, examples: Path, rows: int, split: str, stops: list[int]):
        """Normalized examples -> tokenized rows (Arrow files), their counts and the first three rows;
        examples the template rejects go to the collector and out of the rows."""
        files = arrowio.apply(
            examples,
            tokenize_batch,
            self.work / f"{split}.arrow",
            tokenized_features(),
            {
                "tokenizer": self.tokenizer,
                "labels": self.labels,
                "assistant_only_loss": self.assistant_only_loss,
                "max_length": self.max_length,
                "stop_ids": stops,
            },
            batch_size=TOKENIZE_BATCH,
            processes=self._processes(rows, TOKENIZE_ROWS_PER_PROCESS),
            fingerprint=self._fingerprint(split),
            description=f"Tokenizing {split} data",
            with_rank=True,
        )
        table = arrowio.read_table(files)
        failed = table.column("problem").is_valid().to_numpy(zero_copy_only=False)
        problems = table.column("problem").drop_null().to_pylist()
        _refuse_a_template_that_needs_tools(problems, split, self.collector.on_error)
        for (source, line), problem in zip(_where_failed(table, failed), problems):
            self.collector.bad_row(self.labels[source], line, problem)
        counts = audits.RowCounts.of(table, ~failed)
        if failed.any():
            files = [str(arrowio.write_filtered(files, ~failed, self.work / f"{split}-rendered.arrow"))]
            table = arrowio.read_table(files)
        first = table.slice(0, 3).select(["source", "line", "input_ids", "assistant_masks"]).to_pydict()
        return files, counts, first

    def _processes(self, rows: int, rows_per_process: int) -> int | None:
        count = min(self.cores, rows // rows_per_process, int(os.environ.get("SFTLAB_DATA_PROCESSES") or self.cores))
        return count if count > 1 else None

    def _fingerprint(self, stage: str) -> str:
        # Given, not computed: datasets would otherwise hash the tokenizer on every map.
        return hashlib.sha256(f"{self.key}/{stage}".encode()).hexdigest()[:32]


def _combine(parts: list[tuple[Any, _Rows]]) -> _Rows | None:
    """Several sources' normalized rows as one table: positions in `usable` run on from source to source."""
    import numpy as np

    if not parts:
        return None
    offsets = np.cumsum([0] + [arrowio.read_table(rows.files).num_rows for _, rows in parts])
    sources, start = [], 0
    for source, rows in parts:
        sources.append((source, (start, start + len(rows.usable))))
        start += len(rows.usable)
    return _Rows(
        files=[name for _, rows in parts for name in rows.files],
        usable=np.concatenate([rows.usable + offset for (_, rows), offset in zip(parts, offsets)]).astype(np.int64),
        exact=np.concatenate([rows.exact for _, rows in parts]),
        near=np.concatenate([rows.near for _, rows in parts]),
        sources=sources,
    )


def _problems(table, mask) -> list[tuple[int, str]]:
    """(line, message) of the rows of a normalized table where mask is set and a problem is named."""
    import numpy as np
    import pyarrow as pa

    where = pa.array(np.flatnonzero(mask))
    lines, messages = table.column("line").take(where).to_pylist(), table.column("problem").take(where).to_pylist()
    return [(line, message) for line, message in zip(lines, messages) if message is not None]


def _where_failed(table, failed) -> list[tuple[int, int]]:
    import numpy as np
    import pyarrow as pa

    where = pa.array(np.flatnonzero(failed))
    return list(zip(table.column("source").take(where).to_pylist(), table.column("line").take(where).to_pylist()))


def _refuse_a_template_that_needs_tools(problems: list[str], split: str, on_error: str) -> None:
    """A tool-use template fails on every row without tools: one message for the template, not one per row."""
    lacking = [problem for problem in problems if problem.startswith(NEEDS_TOOLS)]
    if lacking and (on_error == "fail" or len(lacking) == len(problems)):
        raise DataError(
            f"{lacking[0]}; {len(lacking)} {split} rows give no tools",
            hint="give every row a `tools` list, or train with a chat template for plain conversations "
            "(this one is a tool-use template)",
        )


def _why_empty(collector: Collector) -> str:
    if not collector.dropped:
        return "the data holds no rows"
    reasons = ", ".join(
        f"{count} {reason}" for reason, count in sorted(collector.dropped.items(), key=lambda kv: -kv[1])
    )
    return f"every row was dropped: {reasons}"
