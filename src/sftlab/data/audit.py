"""Audit: what `sftlab check` shows, built from per-row counts, and judged against `data.warn_if`.

The tokenizing map writes, for every tokenized row, its length, its trained tokens, the
trained tokens past `max_length`, whether `max_length` leaves it nothing to train and
whether it trains a stop token, and which (see masks.tokenize_batch). The audit is
computed from those columns with numpy, so it costs a few bytes a row and never reads
the tokens again, except for the three examples it shows.

Trade-off: the length statistics (min, median, p95, max, mean) are exact: sorting one
integer array per statistic is cheap next to tokenizing, even for millions of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sftlab.config import DataConfig
from sftlab.data.sources import Collector


@dataclass
class RowCounts:
    """Per-row numbers of a tokenized split, as numpy arrays (see masks.tokenize_batch)."""

    length: Any
    trained: Any  # tokens of the responses (the real masks, whatever assistant_only_loss says)
    trained_cut: Any
    emptied: Any
    stop_trained: Any
    stops: Any  # bit k set: the row trains the k-th stop token

    @classmethod
    def of(cls, table, keep) -> RowCounts:
        """The counts of the kept rows of a tokenized Arrow table."""
        columns = {name: table.column(name).to_numpy()[keep] for name in cls.__dataclass_fields__}
        return cls(**columns)

    @property
    def rows(self) -> int:
        return len(self.length)

    @property
    def tokens(self) -> int:
        return int(self.length.sum())


def build_audit(
    train: RowCounts,
    eval_rows: int,
    eval_tokens: int,
    examples: list[dict],
    formats: dict[str, str],
    counts: dict[str, dict[str, int]],
    collector: Collector,
    duplicates: dict,
    leaked: int,
    max_length: int | None,
    cfg: DataConfig,
    assistant_only_loss: bool,
    stop_tokens: Sequence[str] = (),
) -> dict[str, Any]:
    total_tokens = train.tokens
    response_tokens = int(train.trained.sum())
    trained_tokens = response_tokens if assistant_only_loss else total_tokens
    rows_in = sum(count["rows"] for count in counts.values())
    audit: dict[str, Any] = {
        "ok": True,
        "splits": {
            "train": {"rows": train.rows, "tokens": total_tokens},
            "eval": {"rows": eval_rows, "tokens": eval_tokens},
        },
        "sources": counts,
        "formats": formats,
        "dropped": {"count": sum(collector.dropped.values()), "reasons": collector.dropped},
        "problems": [asdict(problem) for problem in collector.problems],
        "duplicates": {**duplicates, "leakage": leaked},
        "lengths": {
            "prompt": distribution(train.length - train.trained),
            "response": distribution(train.trained),
            "total": distribution(train.length),
        },
        "truncation": truncation(train, max_length),
        "trained_token_share": trained_tokens / total_tokens if total_tokens else 0.0,
        "trained_tokens": trained_tokens,
        # Rows that train no end-of-turn token: the model would never learn to stop.
        "end_of_turn_untrained": int((~train.stop_trained).sum()) if assistant_only_loss else 0,
        # Which stop tokens the examples train (the end-of-turn token, EOS, GLM's next role marker), and in how many.
        "stop": trained_stops(train, stop_tokens),
        "examples": examples,
        "warnings": [],
        "errors": [],
    }
    judge(audit, cfg, rows_in)
    return audit


def trained_stops(train: RowCounts, stop_tokens: Sequence[str]) -> list[dict[str, Any]]:
    """Each stop token that some examples train, with how many examples train it."""
    import numpy as np

    stops = np.asarray(train.stops, dtype=np.int64)
    counts = [(token, int(((stops >> bit) & 1).sum())) for bit, token in enumerate(stop_tokens)]
    return [{"token": token, "examples": count} for token, count in counts if count]


def distribution(values) -> dict[str, float]:
    """min, median (the mean of the middle two for an even count), p95, max and mean, exactly."""
    import numpy as np

    if not len(values):
        return {"min": 0, "median": 0, "p95": 0, "max": 0, "mean": 0}
    ordered = np.sort(np.asarray(values, dtype=np.int64))
    count = len(ordered)
    middle = int(ordered[count // 2]) if count % 2 else (int(ordered[count // 2 - 1]) + int(ordered[count // 2])) / 2
    return {
        "min": int(ordered[0]),
        "median": middle,
        "p95": int(ordered[min(count - 1, int(0.95 * count))]),
        "max": int(ordered[-1]),
        "mean": round(int(ordered.sum()) / count, 1),
    }


def truncation(train: RowCounts, max_length: int | None) -> dict[str, Any]:
    if not max_length:
        return {"max_length": None, "examples_over": 0, "tokens_cut": 0, "trained_tokens_cut": 0, "examples_emptied": 0}
    over = train.length > max_length
    return {
        "max_length": max_length,
        "examples_over": int(over.sum()),
        "tokens_cut": int((train.length[over] - max_length).sum()),
        "trained_tokens_cut": int(train.trained_cut.sum()),
        # TRL keeps the start: a row whose responses all lie past max_length trains nothing and is dropped.
        "examples_emptied": int(train.emptied.sum()),
    }


def marked_example(tokenizer, source: str, line: int, ids: list[int], mask: list[int]) -> dict[str, Any]:
    """The example as trained: runs of tokens, each marked trained or not."""
    segments, run, state = [], [], None
    for token, bit in zip(ids, mask):
        if state is not None and bit != state:
            segments.append({"text": tokenizer.decode(run), "trained": bool(state)})
            run = []
        run.append(token)
        state = bit
    if run:
        segments.append({"text": tokenizer.decode(run), "trained": bool(state)})
    return {"source": source, "line": line, "segments": segments}


def judge(audit: dict, cfg: DataConfig, rows_in: int) -> None:
    """Warnings (training can go ahead) and errors (it cannot), by the configured thresholds."""
    limits = cfg.warn_if
    train_rows = audit["splits"]["train"]["rows"]
    warn = audit["warnings"].append
    duplicates = audit["duplicates"]["exact"] + audit["duplicates"]["near"]
    if rows_in and duplicates / rows_in > limits.duplicate_share:
        warn(f"{duplicates} duplicate rows ({duplicates / rows_in:.1%}) were removed: check how the data was collected")
    if audit["duplicates"]["leakage"] > limits.leakage_rows:
        warn(f"{audit['duplicates']['leakage']} training rows also appear in eval and were removed from train")
    if rows_in and audit["dropped"]["count"] / rows_in > limits.dropped_share:
        warn(f"{audit['dropped']['count']} of {rows_in} rows dropped ({audit['dropped']['count'] / rows_in:.1%})")
    cut = audit["truncation"]
    if train_rows and cut["examples_over"] / train_rows > limits.truncated_share:
        warn(
            f"{cut['examples_over']} examples exceed max_length {cut['max_length']}: "
            f"{cut['trained_tokens_cut']} trained tokens would be cut; raise training.max_length or shorten them"
        )
    if audit["trained_token_share"] < limits.trained_token_share_below:
        warn(f"only {audit['trained_token_share']:.1%} of tokens are trained: prompts dominate the data")
    if audit["end_of_turn_untrained"]:
        warn(
            f"{audit['end_of_turn_untrained']} examples do not train the end-of-turn token: "
            "the model may not learn to stop"
        )
    if not audit["splits"]["eval"]["rows"]:
        warn("no eval data: overfitting cannot be detected (set data.eval or data.eval_split)")
    if train_rows and cut["examples_emptied"] == train_rows:
        audit["errors"].append(f"every example loses all its trained tokens to max_length {cut['max_length']}")
    audit["ok"] = not audit["errors"]
